"""The sketch store: a Zarr v3 hierarchy of immutable parts plus Parquet manifests.

Layout of a store (a directory, or a prefix on object storage such as ``s3://bucket/path``)::

    zarr.json                    root group; attributes hold the projection spec (written once)
    parts/<part>/sketches/       one Zarr array (rows x k) per committed part
    parts/<part>/manifest.parquet  one row per visible sketch: id, checkpoint, split, row, norms, metadata
    scores/<key>/<run>.parquet   influence scores (see scoring.py)
    .staging/                    directory stores: parts being written; never read
    log/<seq>.json               object stores: the commit log naming the committed parts

Rows are stored unit-normalised (x/|x|) with |x| in the manifest: any gradient scale fits
the fp16/bf16 range at full relative precision, and cosine scoring reads rows as stored.
A reader sees whole committed parts or nothing; how a part is committed (rename under a lock,
or a conditional PUT of a log entry) is the backend's job (backend.py). Commits are
serialised, and keys that another writer already committed are left out of the new
manifest, so two writers never duplicate a key. Rows are keyed by (id, checkpoint, split).
"""
from __future__ import annotations

import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr

from .backend import (
    MANIFEST_NAME,  # noqa: F401  (MANIFEST_NAME, PARTS_DIR, STAGING_DIR: the store layout; tests and tools name them)
    PARTS_DIR,  # noqa: F401
    ROOT_METADATA,
    SCORES_DIR,
    STAGING_DIR,  # noqa: F401
    Backend,
    new_name,
    open_backend,
    reason,
)
from .codecs import DEFAULT_CHUNK_BYTES, DEFAULT_COMPRESSOR, parse_compressor, storage_numpy_dtype
from .errors import BadInputError, CorruptDataError, SketchStoreError, SpecMismatchError, StoreNotFoundError, UnknownKeyError
from .parts import SketchBatch, manifest_table, open_array, read_manifests, read_part_rows, stage_array, unit_rows
from .reads import PLAN_COLUMNS, ReadTask, ordered_results, plan_reads
from .spec import ProjectionSpec

FORMAT_NAME = "sketchstore"
FORMAT_VERSION = 1
READER_THREADS = 2


@dataclass(frozen=True)
class StoreInfo:
    """What a store's root attributes say about it."""

    spec: ProjectionSpec
    compressor: str
    chunk_rows: int
    version: int = FORMAT_VERSION

    def to_attrs(self) -> dict:
        return {"format": FORMAT_NAME, "version": self.version, "spec": self.spec.to_dict(),
                "compressor": self.compressor, "chunk_rows": self.chunk_rows}


def default_chunk_rows(spec: ProjectionSpec) -> int:
    return max(1, DEFAULT_CHUNK_BYTES // (spec.dim * storage_numpy_dtype(spec.dtype).itemsize))


class SketchStore:
    """Sketch parts sharing one projection spec, in a directory or on object storage.
    Use ``create``/``open``/``open_or_create``."""

    def __init__(self, backend: Backend, info: StoreInfo, writable: bool) -> None:
        self.backend = backend
        self.path = backend.root
        self.info = info
        self.writable = writable

    # ------------------------------------------------------------------ opening
    @property
    def spec(self) -> ProjectionSpec:
        return self.info.spec

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        """Whether ``path`` (a directory or a URL such as ``s3://bucket/prefix``) holds a store's root metadata."""
        return _io(lambda: open_backend(path).exists(ROOT_METADATA), f"cannot reach store {os.fspath(path)}")

    @classmethod
    def open(cls, path: str | os.PathLike, writable: bool = False) -> "SketchStore":
        """Open an existing store; raises StoreNotFoundError when ``path`` is not one."""
        backend = open_backend(path)
        path = backend.root
        if not _io(backend.exists, f"cannot reach store {path}"):
            raise StoreNotFoundError(f"sketch store not found: {path}")
        if not _io(lambda: backend.exists(ROOT_METADATA), f"cannot reach store {path}"):
            raise StoreNotFoundError(f"not a sketch store (no zarr.json): {path}")
        try:
            attrs = json.loads(backend.read_bytes(ROOT_METADATA)).get("attributes", {}).get(FORMAT_NAME)
        except (OSError, json.JSONDecodeError) as err:
            raise CorruptDataError(f"store root metadata {backend.location(ROOT_METADATA)} is unreadable: {err}") from err
        if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
            raise StoreNotFoundError(f"not a sketch store (zarr group without sketchstore attributes): {path}")
        if attrs.get("version") != FORMAT_VERSION:
            raise SpecMismatchError(f"store {path} has format version {attrs.get('version')}, this library reads {FORMAT_VERSION}")
        info = StoreInfo(ProjectionSpec.from_dict(attrs["spec"]), attrs["compressor"], int(attrs["chunk_rows"]))
        if writable:
            _io(backend.check_writable, f"cannot write to store {path}")
        return cls(backend, info, writable)

    @classmethod
    def create(cls, path: str | os.PathLike, spec: ProjectionSpec, compressor: str = DEFAULT_COMPRESSOR,
               chunk_rows: int | None = None) -> "SketchStore":
        """Create a new empty store at ``path`` (which must not exist or be empty)."""
        backend = open_backend(path)
        parse_compressor(compressor)
        info = StoreInfo(spec, compressor, chunk_rows or default_chunk_rows(spec))
        _io(lambda: backend.create({FORMAT_NAME: info.to_attrs()}), f"cannot create store at {backend.root}")
        return cls(backend, info, writable=True)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, spec: ProjectionSpec, compressor: str = DEFAULT_COMPRESSOR,
                       chunk_rows: int | None = None) -> "SketchStore":
        """Open ``path`` for appending if it is a store with an equal spec, else create it."""
        if cls.exists(path):
            store = cls.open(path, writable=True)
            store.spec.check_compatible(spec, what=f"sketches for {store.path}")
            return store
        return cls.create(path, spec, compressor=compressor, chunk_rows=chunk_rows)

    # ------------------------------------------------------------------ writing
    def append(self, checkpoint: str, split: str, batch: SketchBatch, source: dict | None = None) -> int:
        """Write ``batch`` as one new part; returns the number of rows made visible.

        Keys already stored (by this or a concurrent writer) are skipped. Nothing is visible
        until the part is complete; a failure leaves the store as it was.
        """
        if not self.writable:
            raise BadInputError(f"store {self.path} was opened read-only")
        ids = [str(i) for i in batch.ids]
        n = len(ids)
        sketches = batch.sketches
        if sketches.ndim != 2 or sketches.shape[0] != n or sketches.shape[1] != self.spec.dim:
            raise SpecMismatchError(
                f"sketch batch has shape {tuple(sketches.shape)}, expected ({n}, {self.spec.dim}) for this store")
        if len(set(ids)) != n:
            raise BadInputError(f"duplicate ids in one batch for {checkpoint}:{split}")
        if len(batch.grad_norms) != n or len(batch.n_tokens) != n or (batch.metadata and len(batch.metadata) != n):
            raise BadInputError("sketch batch columns have different lengths")
        if n == 0:
            return 0
        part = new_name()
        try:
            data, sketch_norms = unit_rows(ids, sketches, self.spec.dtype)
            stage_array(self.backend, part, data, self.info.chunk_rows, self.info.compressor,
                        {"checkpoint": checkpoint, "split": split, "source": source or {}})
            table = manifest_table(part, checkpoint, split, ids, batch, sketch_norms, source or {})

            def without_taken() -> pa.Table:
                taken = self.existing_ids(checkpoint, split, ids)
                if not taken:
                    return table
                return table.take(pa.array([i for i, key in enumerate(ids) if key not in taken], pa.int64()))

            return self.backend.commit_part(part, without_taken)
        except OSError as err:
            self.backend.discard_part(part)
            raise SketchStoreError(f"writing a part to {self.path} failed ({reason(err)}); the store is unchanged") from err
        except BaseException:
            self.backend.discard_part(part)
            raise

    def write_scores(self, key: str, table: pa.Table) -> None:
        """Add a Parquet file of scores under ``scores/<key>/``; visible only once complete."""
        if not self.writable:
            raise BadInputError(f"store {self.path} was opened read-only")
        if table.num_rows == 0:
            return
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        try:
            self.backend.put(f"{SCORES_DIR}/{key}/{new_name()}.parquet", buffer.getvalue())
        except OSError as err:
            raise SketchStoreError(f"writing scores to {self.path} failed ({reason(err)}); the store is unchanged") from err

    def score_files(self, key: str = "*") -> list[str]:
        """Locations of the score files of one score key (default: of all keys)."""
        return self.backend.glob(f"{SCORES_DIR}/{key}/*.parquet")

    # ------------------------------------------------------------------ reading
    def manifest_sources(self) -> list[str]:
        """Paths or globs of exactly the committed manifests (what DuckDB reads)."""
        return self.backend.manifest_sources()

    def part_names(self) -> list[str]:
        return self.backend.committed_parts()

    def manifest(self, checkpoint: str | None = None, split: str | None = None,
                 columns: Sequence[str] | None = None) -> pa.Table:
        """The manifest rows of all committed parts (optionally of one checkpoint/split)."""
        return read_manifests(self.backend, self.part_names(), checkpoint, split, columns)

    def existing_ids(self, checkpoint: str, split: str, among: Sequence[str] | None = None) -> set[str]:
        """Ids already stored for (checkpoint, split), optionally restricted to ``among``."""
        ids = set(self.manifest(checkpoint, split, columns=["id", "checkpoint", "split"]).column("id").to_pylist())
        return ids & set(among) if among is not None else ids

    def keys(self) -> list[tuple[str, str, int]]:
        """(checkpoint, split, rows) for everything stored."""
        table = self.manifest(columns=["checkpoint", "split"])
        counts: dict[tuple[str, str], int] = {}
        for ckpt, split in zip(table.column("checkpoint").to_pylist(), table.column("split").to_pylist()):
            counts[(ckpt, split)] = counts.get((ckpt, split), 0) + 1
        return [(c, s, n) for (c, s), n in sorted(counts.items())]

    def require(self, checkpoint: str, split: str) -> None:
        """Raise UnknownKeyError when no rows exist for (checkpoint, split)."""
        keys = self.keys()
        if not any(c == checkpoint and s == split for c, s, _ in keys):
            known = ", ".join(f"{c}:{s}" for c, s, _ in keys) or "nothing"
            raise UnknownKeyError(f"no sketches for checkpoint:split {checkpoint}:{split} in {self.path} (stored: {known})")

    def open_part(self, part: str) -> zarr.Array:
        """The committed Zarr array of ``part`` (read-only)."""
        return open_array(self.backend, part)

    def read_rows(self, part: str, start: int, stop: int) -> torch.Tensor:
        """Stored (unit-norm) float32 rows [start, stop) of a part; a missing or damaged chunk is
        CorruptDataError naming the part and chunk."""
        return read_part_rows(self.backend, part, start, stop, self.spec.dtype)

    def plan_reads(self, checkpoint: str, split: str, exclude: set[str] | None = None,
                   block_rows: int | None = None) -> list[ReadTask]:
        """The reads of (checkpoint, split) in storage order, ``block_rows`` aligned rows at most each
        (default: one chunk); rows in ``exclude`` are left out (see reads.py)."""
        manifest = self.manifest(checkpoint, split, columns=list(PLAN_COLUMNS))
        return plan_reads(manifest, block_rows or self.info.chunk_rows, exclude)

    def load(self, task: ReadTask, unit: bool = False) -> torch.Tensor:
        """One task's float32 sketches: unit rows as stored (``unit=True``), else rescaled by their norms."""
        first, last = task.span
        data = self.read_rows(task.part, first, last)
        if len(task.rows) != last - first:
            data = data.index_select(0, torch.from_numpy(task.rows - first))
        if not unit:
            data.mul_(torch.from_numpy(task.norms)[:, None])
        return data

    def iter_blocks(self, checkpoint: str, split: str, exclude: set[str] | None = None,
                    block_rows: int | None = None, unit: bool = False,
                    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    ) -> Iterator[tuple[list[str], torch.Tensor]]:
        """Stream (ids, float32 sketches) for (checkpoint, split), one block at a time, in order.

        Memory is bounded by ``block_rows`` rows (default: the chunk size) times the number of
        reader threads; rows in ``exclude`` are skipped. ``unit=True`` yields rows as stored
        (x/|x|). Blocks are read, decoded and passed through ``transform`` (e.g. a product with
        score targets) in background threads, so decoding overlaps with use.
        """
        def read(task: ReadTask) -> tuple[list[str], torch.Tensor]:
            data = self.load(task, unit)
            return list(task.ids), data if transform is None else transform(data)

        with ThreadPoolExecutor(max_workers=READER_THREADS) as pool:
            yield from ordered_results(pool, read, self.plan_reads(checkpoint, split, exclude, block_rows),
                                       window=READER_THREADS + 1)

    def read(self, checkpoint: str, split: str, ids: Sequence[str] | None = None) -> tuple[list[str], torch.Tensor]:
        """All (or the given) sketches of (checkpoint, split) in memory; for small sets such as validation."""
        self.require(checkpoint, split)
        out_ids: list[str] = []
        blocks = []
        for block_ids, block in self.iter_blocks(checkpoint, split):
            out_ids.extend(block_ids)
            blocks.append(block)
        matrix = torch.cat(blocks) if blocks else torch.zeros(0, self.spec.dim)
        if ids is not None:
            position = {key: i for i, key in enumerate(out_ids)}
            missing = [key for key in ids if key not in position]
            if missing:
                raise UnknownKeyError(f"{len(missing)} ids not stored for {checkpoint}:{split}, e.g. {missing[0]!r}")
            matrix = matrix[[position[key] for key in ids]]
            out_ids = list(ids)
        return out_ids, matrix


def _io(call: Callable[[], Any], what: str) -> Any:
    """Run a backend call; an I/O failure becomes one line naming the store."""
    try:
        return call()
    except OSError as err:
        raise SketchStoreError(f"{what}: {reason(err)}") from err
