"""Checking a whole store, and setting damaged parts aside so their rows can be rebuilt."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .errors import CorruptDataError
from .store import MANIFEST_NAME, PARTS_DIR, STAGING_DIR, SketchStore

QUARANTINE_DIR = ".quarantine"


@dataclass(frozen=True)
class Problem:
    part: str
    message: str

    def __str__(self) -> str:
        return f"{self.part}: {self.message}"


def _check_part(store: SketchStore, part: str) -> list[Problem]:
    path = store.path / PARTS_DIR / part
    try:
        manifest = pq.read_table(path / MANIFEST_NAME, columns=["row"])
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
    for orphan in sorted(p for p in (store.path / PARTS_DIR).iterdir() if not (p / MANIFEST_NAME).is_file()):
        problems.append(Problem(orphan.name, "part directory without a manifest (ignored by readers)"))
    return problems


def _writer_alive(name: str) -> bool:
    """Staged names are ``<time>-<pid>-<random>``: is that writer process still running?"""
    fields = name.split("-")
    if len(fields) < 3 or not fields[1].isdigit():
        return False
    try:
        os.kill(int(fields[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_staging(store: SketchStore) -> list[str]:
    """Leftovers in ``.staging`` of writers that are no longer running (never read by anyone)."""
    return sorted(p.name for p in (store.path / STAGING_DIR).iterdir() if not _writer_alive(p.name))


def repair(store: SketchStore) -> list[str]:
    """Move damaged parts to ``.quarantine/`` so their rows disappear and a re-build rebuilds them.

    Returns the parts moved. Healthy parts are not touched.
    """
    damaged = sorted({p.part for p in verify(store)})
    target = store.path / QUARANTINE_DIR
    target.mkdir(exist_ok=True)
    for part in damaged:
        os.rename(store.path / PARTS_DIR / part, target / part)
    for leftover in stale_staging(store):
        shutil.rmtree(store.path / STAGING_DIR / leftover, ignore_errors=True)
    return damaged
