"""Checking a whole store, and setting damaged parts aside so their rows can be rebuilt."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
from tqdm import tqdm

from .data import read_parquet_bytes
from .errors import CorruptDataError
from .store import MANIFEST_NAME, PARTS_DIR, SketchStore


@dataclass(frozen=True)
class Problem:
    part: str
    message: str

    def __str__(self) -> str:
        return f"{self.part}: {self.message}"


def _check_part(store: SketchStore, part: str) -> list[Problem]:
    try:
        data = store.backend.read_bytes(f"{PARTS_DIR}/{part}/{MANIFEST_NAME}")
        manifest = read_parquet_bytes(data, ["row"])
    except (OSError, pa.ArrowException) as err:
        return [Problem(part, f"manifest unreadable ({err})")]
    try:
        array = store.open_part(part)
    except CorruptDataError as err:
        return [Problem(part, str(err))]
    problems = []
    rows = manifest.column("row").to_pylist()
    if rows and max(rows) >= array.shape[0]:
        problems.append(Problem(part, f"manifest names row {max(rows)} but the array has {array.shape[0]} rows"))
    if array.shape[1] != store.spec.dim:
        problems.append(Problem(part, f"array width {array.shape[1]} != store dim {store.spec.dim}"))
    step = array.chunks[0]
    for start in range(0, array.shape[0], step):
        try:
            store.read_rows(part, start, min(start + step, array.shape[0]))
        except CorruptDataError as err:
            problems.append(Problem(part, str(err).split(": ", 1)[-1]))
    return problems


def verify(store: SketchStore, progress: bool = False) -> list[Problem]:
    """Every problem found in the committed parts (reads every chunk; changes nothing)."""
    problems: list[Problem] = []
    for part in tqdm(store.part_names(), desc="verify", unit="part", disable=not progress):
        problems.extend(_check_part(store, part))
    for orphan in store.backend.orphan_parts():
        problems.append(Problem(orphan, "part directory without a manifest (ignored by readers)"))
    return problems


def stale_staging(store: SketchStore) -> list[str]:
    """Leftovers of interrupted writes whose writer is gone (never read by anyone)."""
    return store.backend.stale_writes()


def repair(store: SketchStore) -> list[str]:
    """Set damaged parts aside (``.quarantine/``, or a retraction in an object store's commit log)
    so their rows disappear and a re-build rebuilds them, and remove stale leftovers.

    Returns the parts set aside. Healthy parts are not touched.
    """
    damaged = sorted({p.part for p in verify(store)})
    for part in damaged:
        store.backend.quarantine(part)
    for leftover in stale_staging(store):
        store.backend.remove_stale(leftover)
    return damaged
