"""Reading and writing row datasets (JSONL or Parquet, chosen by file extension)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_file
from .errors import BadInputError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise BadInputError(f"{path}: unsupported data file type {suffix!r} (use .jsonl or .parquet)")


def read_json_lines(path: Path) -> list[dict]:
    """Objects of a JSON-lines file (blank lines skipped); a bad line is named by number."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise BadInputError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise BadInputError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append(row)
    return rows


def read_parquet_rows(path: Path) -> list[dict]:
    """Rows of a Parquet file as dicts."""
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as err:
        raise BadInputError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0] if str(err) else err!r})") from None


def read_rows(path: str | os.PathLike, required: Sequence[str] = ()) -> list[dict]:
    """Rows of a JSONL/Parquet file; checks ``required`` columns and unique string ``id``s."""
    path = Path(path)
    fmt = _format_of(path)
    if not path.is_file():
        raise BadInputError(f"data file not found: {path}")
    rows = read_json_lines(path) if fmt == "jsonl" else read_parquet_rows(path)
    check_rows(rows, required, str(path))
    return rows


def check_rows(rows: list[dict], required: Sequence[str], source: str) -> None:
    """Raise BadInputError naming ``source`` for missing columns, null values or duplicate ids."""
    if not rows:
        raise BadInputError(f"{source}: no rows")
    for index, row in enumerate(rows):
        missing = [c for c in required if row.get(c) is None]
        if missing:
            raise BadInputError(f"{source}: row {index} is missing column(s) {', '.join(missing)}")
    if "id" in required:
        seen: set[str] = set()
        for row in rows:
            key = row["id"] = str(row["id"])
            if key in seen:
                raise BadInputError(f"{source}: duplicate id {key!r}")
            seen.add(key)


def write_rows(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write rows to JSONL or Parquet (by extension), via a temporary file renamed into place."""
    path = Path(path)
    fmt = _format_of(path)
    rows = list(rows)
    try:
        if fmt == "jsonl":
            with atomic_file(path, "w", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        else:
            columns = dict.fromkeys(key for row in rows for key in row)  # every row's keys, first-seen order
            table = pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows])
            with atomic_file(path) as handle:
                pq.write_table(table, handle)
    except OSError as err:  # nothing half-written stays behind (atomic_file removes its temporary file)
        raise BadInputError(f"cannot write {path}: {err.strerror or err}") from err
    return path


def read_parquet_bytes(data: bytes, columns: Sequence[str] | None = None) -> pa.Table:
    """A Parquet file held in memory, read and decoded in the calling thread.

    Not ``pq.read_table(pa.BufferReader(data))``: that scans asynchronously, and the scan's last
    reference to the Python-owned buffer can be dropped by an Arrow worker thread, which then
    needs the GIL; at interpreter exit that thread is killed inside a C++ destructor and the
    process aborts ("terminate called without an active exception", seen here in 1 of 3 runs)."""
    return pq.ParquetFile(pa.BufferReader(data)).read(columns=columns, use_threads=False)
