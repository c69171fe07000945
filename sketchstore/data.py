"""Reading and writing row datasets.

:func:`read_source` reads the rows of what users have, without a conversion step: a JSONL or
JSON file, a Parquet file, a directory or glob of Parquet shards, an Arrow file, or a Hugging
Face ``datasets`` directory written by ``Dataset.save_to_disk`` (its Arrow stream files are read
with pyarrow; the ``datasets`` package is not needed). :func:`read_rows` adds what a build needs:
the canonical columns (``id``, ``prompt``, ``response``, ``answer``) taken from a
:class:`ColumnMap` or a known layout (:data:`LAYOUTS`), and stable ids for rows that have none.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_file
from .errors import BadInputError
from .options import option

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIXES = (".arrow",)
GLOB_CHARS = "*?["
HF_STATE = "state.json"  # what Dataset.save_to_disk writes next to its Arrow files
HF_DICT = "dataset_dict.json"  # DatasetDict.save_to_disk: one sub-directory per split
#: Column layouts recognised without a mapping, {canonical name: column}; one applies only when
#: every one of its columns is present and none of its canonical names is.
LAYOUTS: tuple[Mapping[str, str], ...] = (
    {"prompt": "question", "response": "answer"},  # question/answer datasets (GSM8K)
    {"prompt": "problem", "response": "solution"},  # problem/solution datasets (MATH)
)
#: Columns an id is taken from, in order, when a row has no ``id`` (MATH-500 has ``unique_id``).
ID_COLUMNS = ("id", "unique_id")
STABLE_ID_PREFIX = "h-"
STABLE_ID_HEX = 16


@dataclass(frozen=True)
class ColumnMap:
    """Which columns of a dataset hold the canonical fields, when their names differ."""

    prompt_column: str | None = option(None, "Column holding the prompt [default: prompt; question or problem "
                                             "in question/answer and problem/solution datasets].")
    response_column: str | None = option(None, "Column holding the response [default: response; answer or "
                                                 "solution in question/answer and problem/solution datasets].")
    answer_column: str | None = option(None, "Column holding the final answer [default: answer].")
    id_column: str | None = option(None, "Column holding the row id [default: id, else unique_id, else a hash "
                                         "of the prompt].")

    def mapping(self) -> dict[str, str]:
        """{canonical name: column} for the columns given."""
        return {f.name.removesuffix("_column"): getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}


CANONICAL = tuple(f.name.removesuffix("_column") for f in fields(ColumnMap))


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise BadInputError(f"{path}: unsupported data file type {suffix!r} (use .jsonl or .parquet)")


def is_glob(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a glob pattern (e.g. ``data/train-*.parquet``)."""
    return any(c in str(path) for c in GLOB_CHARS)


def source_kind(path: str | os.PathLike) -> str | None:
    """What :func:`read_source` reads ``path`` as: ``jsonl``, ``parquet``, ``arrow``, ``hf-dataset``,
    ``hf-dataset-dict``, ``parquet-shards`` or ``glob``; None when it is none of these (or absent)."""
    p = Path(path)
    if is_glob(p) and not p.exists():
        return "glob"
    if p.is_dir():
        if (p / HF_STATE).is_file():
            return "hf-dataset"
        if (p / HF_DICT).is_file():
            return "hf-dataset-dict"
        return "parquet-shards" if _parquet_files(p) else None
    suffix = p.suffix.lower()
    kinds = [("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES), ("arrow", ARROW_SUFFIXES)]
    return next((kind for kind, suffixes in kinds if suffix in suffixes), None)


def _parquet_files(directory: Path) -> list[Path]:
    return sorted(q for q in directory.iterdir() if q.is_file() and q.suffix.lower() in PARQUET_SUFFIXES)


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


def read_json_rows(path: Path) -> list[dict]:
    """Rows of a ``.json`` file holding a list of objects (or ``{"data": [...]}``), else of JSON lines."""
    if path.suffix.lower() == ".json":
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise BadInputError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
            if not all(isinstance(row, dict) for row in rows):
                raise BadInputError(f"{path}: expected a JSON list of objects")
            return rows
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict) and isinstance(whole.get("data"), list):
            return whole["data"]
    return read_json_lines(path)


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else repr(err)


def read_parquet_rows(path: Path) -> list[dict]:
    """Rows of a Parquet file as dicts."""
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as err:
        raise BadInputError(f"{path}: not a readable Parquet file ({_first_line(err)})") from None


def read_arrow_rows(path: Path) -> list[dict]:
    """Rows of an Arrow IPC file, stream format (what ``datasets`` writes) or file format."""
    try:
        with pa.memory_map(str(path)) as source:
            try:
                return pa.ipc.open_stream(source).read_all().to_pylist()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all().to_pylist()
    except (OSError, pa.ArrowException) as err:
        raise BadInputError(f"{path}: not a readable Arrow file ({_first_line(err)})") from None


def _hf_dataset_files(directory: Path) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` directory, in the order its state.json lists them."""
    try:
        state = json.loads((directory / HF_STATE).read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadInputError(f"{directory}: unreadable {HF_STATE} of a datasets directory ({err})") from None
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise BadInputError(f"{directory}: datasets directory lacks {missing[0]} (listed in {HF_STATE})")
    return [directory / name for name in names]


def _hf_splits(directory: Path) -> list[str]:
    try:
        return list(json.loads((directory / HF_DICT).read_text(encoding="utf-8"))["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(q.name for q in directory.iterdir() if (q / HF_STATE).is_file())


def read_source(path: str | os.PathLike) -> list[dict]:
    """Every row of a dataset file, directory or glob (see the module docstring), in file order;
    shards of a directory or glob are read in sorted path order."""
    p = Path(path)
    kind = source_kind(p)
    if kind is None:
        if not p.exists():
            raise BadInputError(f"data file not found: {p}")
        if p.is_dir():
            raise BadInputError(f"{p}: a directory without Parquet files or a datasets save_to_disk layout")
        _format_of(p)  # names the unsupported suffix
    if kind == "glob":
        files = sorted(Path(q) for q in glob.glob(str(p)) if Path(q).is_file())
        if not files:
            raise BadInputError(f"data file not found: no file matches {p}")
        return [row for q in files for row in read_source(q)]
    if kind == "hf-dataset-dict":
        splits = _hf_splits(p)
        raise BadInputError(f"{p}: a datasets DatasetDict with splits {', '.join(splits)}; give one split's "
                            f"directory, e.g. {p / (splits[0] if splits else 'train')}")
    if kind == "hf-dataset":
        return [row for q in _hf_dataset_files(p) for row in read_arrow_rows(q)]
    if kind == "parquet-shards":
        return [row for q in _parquet_files(p) for row in read_parquet_rows(q)]
    if not p.is_file():
        raise BadInputError(f"data file not found: {p}")
    if kind == "arrow":
        return read_arrow_rows(p)
    return read_json_rows(p) if kind == "jsonl" else read_parquet_rows(p)


def columns_of(rows: Sequence[dict]) -> list[str]:
    """Every column of ``rows``, first-seen order."""
    return list(dict.fromkeys(key for row in rows for key in row))


def map_columns(rows: list[dict], columns: ColumnMap | None, source: str) -> list[dict]:
    """Rows with the mapped columns under their canonical names. A mapped column leaves its old
    name unless that is itself a canonical name (so ``--response-column answer`` keeps ``answer``).
    A column that is not there is refused, listing those that are."""
    mapping = columns.mapping() if columns is not None else {}
    if not mapping:
        return rows
    present = columns_of(rows)
    for name, column in mapping.items():
        if column not in present:
            raise BadInputError(f"{source}: no column {column!r} (--{name}-column); its columns: {', '.join(present)}")
    dropped = set(mapping.values()) - set(CANONICAL)
    return [{**{k: v for k, v in row.items() if k not in dropped and k not in mapping},
             **{name: row.get(column) for name, column in mapping.items()}} for row in rows]


def _apply_layout(rows: list[dict], wanted: Sequence[str]) -> list[dict]:
    """Rows with the canonical columns ``wanted`` that are absent taken from a known layout."""
    present = set(columns_of(rows))
    missing = [name for name in wanted if name not in present]
    for layout in LAYOUTS:
        if missing and not (set(layout) & present) and set(layout.values()) <= present and set(missing) <= set(layout):
            renamed = {column: name for name, column in layout.items()}
            return [{renamed.get(k, k): v for k, v in row.items()} for row in rows]
    return rows


def _prompt_column(rows: list[dict]) -> str | None:
    present = set(columns_of(rows))
    if "prompt" in present:
        return "prompt"
    return next((layout["prompt"] for layout in LAYOUTS if set(layout.values()) <= present), None)


def stable_id(text: str) -> str:
    """An id derived from a row's prompt text (the same in every process)."""
    return STABLE_ID_PREFIX + hashlib.sha1(text.encode("utf-8")).hexdigest()[:STABLE_ID_HEX]


def stable_ids(texts: Iterable[str]) -> list[str]:
    """:func:`stable_id` of each text, with ``-1``, ``-2``, ... appended to repeats in order."""
    seen: dict[str, int] = {}
    out = []
    for text in texts:
        base = stable_id(text)
        nth = seen[base] = seen.get(base, -1) + 1
        out.append(base if nth == 0 else f"{base}-{nth}")
    return out


def given_id(row: Mapping) -> object | None:
    """A row's own id: its first non-empty :data:`ID_COLUMNS` value, else None."""
    return next((row[c] for c in ID_COLUMNS if row.get(c) not in (None, "")), None)


def _with_ids(rows: list[dict], source: str) -> list[dict]:
    """Rows given an ``id`` when they lack one: from :data:`ID_COLUMNS`, else :func:`stable_ids` of the prompt."""
    if all(row.get("id") not in (None, "") for row in rows):
        return rows
    prompt = _prompt_column(rows)
    lacking = [row for row in rows if given_id(row) is None]
    if lacking and prompt is None:
        return rows  # check_rows names the missing id
    derived = iter(stable_ids(str(row.get(prompt, "")) for row in lacking))
    out = []
    for row in rows:
        if row.get("id") in (None, ""):
            own = given_id(row)
            row = {"id": own if own is not None else next(derived), **{k: v for k, v in row.items() if k != "id"}}
        out.append(row)
    return out


def read_rows(path: str | os.PathLike, required: Sequence[str] = (), columns: ColumnMap | None = None) -> list[dict]:
    """Rows of a dataset (:func:`read_source`) with the ``required`` columns, mapped by ``columns``
    or found in a known layout, and unique string ids (derived when absent; see :func:`stable_ids`)."""
    rows = read_source(path)
    source = str(path)
    rows = _apply_layout(map_columns(rows, columns, source), [c for c in required if c != "id"])
    if "id" in required and rows:
        rows = _with_ids(rows, source)
    check_rows(rows, required, source)
    return rows


def check_rows(rows: list[dict], required: Sequence[str], source: str) -> None:
    """Raise BadInputError naming ``source`` for missing columns, null values or duplicate ids."""
    if not rows:
        raise BadInputError(f"{source}: no rows")
    present = set(columns_of(rows))
    for index, row in enumerate(rows):
        missing = [c for c in required if row.get(c) is None]
        if missing:
            hint = ""
            if any(c not in present for c in missing):
                hint = (f" (its columns: {', '.join(columns_of(rows))}; name one with "
                        f"{' or '.join(f'--{c}-column' for c in missing if c not in present)})")
            raise BadInputError(f"{source}: row {index} is missing column(s) {', '.join(missing)}{hint}")
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
