"""One part of a store on its backend: a Zarr array of unit-normalised rows plus its manifest table.

A part is written to the backend's staging area (committing it is the backend's job) and read
back with every damage named: a missing chunk, a failed checksum, an unreadable manifest.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch
import zarr

from .backend import MANIFEST_NAME, PARTS_DIR, Backend, reason
from .codecs import codec_chain, from_storage, to_storage
from .data import read_parquet_bytes
from .errors import BadInputError, CorruptDataError

ARRAY_NAME = "sketches"
KEY_COLUMNS = ("id", "checkpoint", "split")
SOURCE_COLUMNS = ("model_fingerprint", "objective")
RESERVED_COLUMNS = KEY_COLUMNS + ("part", "row", "grad_norm", "sketch_norm", "n_tokens") + SOURCE_COLUMNS
MIN_NORM = 1e-30


@dataclass
class SketchBatch:
    """Rows to append: keys, float32 sketches (n, k) and per-row facts for the catalog."""

    ids: Sequence[str]
    sketches: torch.Tensor
    grad_norms: Sequence[float]
    n_tokens: Sequence[int]
    metadata: Sequence[dict] = field(default_factory=list)


def _metadata_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return json.dumps(value, default=str)


def _metadata_columns(metadata: Sequence[dict], n: int) -> dict[str, list]:
    """Per-row metadata dicts -> columns; a name clashing with a store column gets a ``meta_`` prefix."""
    names: list[str] = []
    for row in metadata:
        names.extend(k for k in row if k not in names)
    columns = {}
    for name in names:
        column = f"meta_{name}" if name in RESERVED_COLUMNS else name
        values = [_metadata_value(row.get(name)) for row in metadata] if metadata else [None] * n
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) > 1 and not kinds <= {int, float}:
            values = [None if v is None else str(v) for v in values]
        columns[column] = values
    return columns


def unit_rows(ids: Sequence[str], sketches: torch.Tensor, dtype: str) -> tuple[np.ndarray, torch.Tensor]:
    """(rows x/|x| in the storage dtype, float32 norms |x|); a non-finite row is refused by id."""
    sketches = sketches.float()
    sketch_norms = sketches.norm(dim=1)
    if not torch.isfinite(sketch_norms).all():
        bad = ids[int((~torch.isfinite(sketch_norms)).nonzero()[0])]
        raise BadInputError(f"sketch of row {bad!r} is not finite (inf/nan gradient); nothing was written")
    return to_storage(sketches / sketch_norms.clamp_min(MIN_NORM)[:, None], dtype), sketch_norms


def stage_array(backend: Backend, part: str, data: np.ndarray, chunk_rows: int, compressor: str,
                attributes: dict) -> None:
    """Write ``data`` as the Zarr v3 array of ``part`` in the backend's staging area."""
    array = zarr.create_array(
        store=backend.zarr_store(f"{backend.staging_dir(part)}/{ARRAY_NAME}", read_only=False),
        shape=data.shape, dtype=data.dtype,
        chunks=(min(chunk_rows, data.shape[0]), data.shape[1]),
        compressors=codec_chain(compressor, data.dtype.itemsize),
        config={"write_empty_chunks": True},
        attributes=attributes,
        zarr_format=3)
    array[:] = data


def manifest_table(part: str, checkpoint: str, split: str, ids: list[str], batch: SketchBatch,
                   sketch_norms: torch.Tensor, source: dict) -> pa.Table:
    """The manifest of a part: one row per sketch with its key, position, norms, source and metadata."""
    n = len(ids)
    columns = {
        "id": ids, "checkpoint": [checkpoint] * n, "split": [split] * n, "part": [part] * n,
        "row": list(range(n)), "grad_norm": [float(x) for x in batch.grad_norms],
        "sketch_norm": sketch_norms.tolist(), "n_tokens": [int(x) for x in batch.n_tokens],
        "model_fingerprint": [str(source.get("fingerprint", ""))] * n,
        "objective": [str(source.get("objective", ""))] * n,
        **_metadata_columns(batch.metadata, n),
    }
    return pa.table(columns)


def read_manifests(backend: Backend, parts: Sequence[str], checkpoint: str | None = None,
                   split: str | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """The manifest rows of ``parts`` (optionally of one checkpoint/split), ``columns`` only when given."""
    wanted = list(columns) if columns else None
    read_cols = None if wanted is None else list(dict.fromkeys(wanted + ["checkpoint", "split"]))
    names = [f"{PARTS_DIR}/{part}/{MANIFEST_NAME}" for part in parts]
    try:
        contents = backend.read_many(names)
    except OSError as err:
        raise CorruptDataError(f"a manifest of {backend.root} is unreadable: {reason(err)}") from err
    tables = []
    for name, data in zip(names, contents):
        try:
            table = read_parquet_bytes(data, read_cols)
        except (OSError, pa.ArrowException) as err:
            raise CorruptDataError(f"manifest {backend.location(name)} is unreadable: {err}") from err
        mask = np.ones(table.num_rows, dtype=bool)
        if checkpoint is not None:
            mask &= np.asarray(table.column("checkpoint").to_pylist(), dtype=object) == checkpoint
        if split is not None:
            mask &= np.asarray(table.column("split").to_pylist(), dtype=object) == split
        if not mask.any():
            continue
        if not mask.all():
            table = table.filter(pa.array(mask))
        tables.append(table.select(wanted) if wanted else table)
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in (wanted or KEY_COLUMNS)})
    return pa.concat_tables(tables, promote_options="permissive")


def open_array(backend: Backend, part: str) -> zarr.Array:
    """The committed Zarr array of ``part``, read-only; damaged metadata is CorruptDataError."""
    store = backend.zarr_store(f"{PARTS_DIR}/{part}/{ARRAY_NAME}", read_only=True)
    try:
        return zarr.open_array(store=store, mode="r", zarr_format=3)
    except Exception as err:  # zarr raises several types for damaged metadata
        raise CorruptDataError(f"part {part} in {backend.root}: array metadata unreadable ({err})") from err


def read_part_rows(backend: Backend, part: str, start: int, stop: int, dtype: str) -> torch.Tensor:
    """Stored (unit-norm) float32 rows [start, stop) of a part.

    A chunk failing its checksum, or missing (zarr would silently read it as zeros),
    raises CorruptDataError naming the part and chunk.
    """
    array = open_array(backend, part)
    step = array.chunks[0]
    for chunk in range(start // step, (stop - 1) // step + 1):
        if not backend.exists(f"{PARTS_DIR}/{part}/{ARRAY_NAME}/c/{chunk}/0"):
            raise CorruptDataError(f"part {part} in {backend.root}: chunk {chunk} is missing")
    try:
        block = array[start:stop]
    except Exception as err:  # checksum and codec failures surface as various exception types
        raise CorruptDataError(
            f"part {part} in {backend.root}: chunk {start // step} (rows {start}-{stop}) failed to decode "
            f"({type(err).__name__}: {err})") from err
    return from_storage(block, dtype)
