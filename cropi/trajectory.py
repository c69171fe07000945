"""The trajectory record and the trajectory store.

A :class:`Trajectory` is one response sampled by a behaviour policy, with what POPI and GRPO
need: token ids, the log-probs of the distribution it was sampled from, the reward and the
GRPO group advantage. Rollouts make them, POPI and the GRPO update read them; the Parquet
schema (:data:`TRAJECTORY_SCHEMA`) is derived from the record, so the two cannot drift.

The store
---------
A trajectory store is a directory (conventionally named ``*.parquet``) of part files
``part-<time_ns>-<pid>-<seq>.parquet``; each part holds whole prompt groups (all K samples
of a prompt for one behaviour) and is written atomically (:func:`sketchstore.atomic.atomic_file`),
so a crash never exposes a half-written part and a finished group is never lost::

    duckdb:   SELECT * FROM read_parquet('TRAJ.parquet/part-*.parquet')
    python:   read_trajectories('TRAJ.parquet')         # pyarrow.Table, sorted

One row per trajectory, keyed by ``(prompt_id, behaviour, sample)``. One writer at a time
(:func:`locked`); several behaviours (e.g. one per policy checkpoint) may share a store.

Field semantics
---------------
* ``prompt_token_ids``: the prompt as the policy saw it (:func:`sketchstore.prompts.encode_prompt`);
  ``prompt`` is the raw task text.
* ``response_token_ids``: every sampled token, including the final end-of-turn token when
  ``finish_reason == "stop"``; no padding.
* ``behaviour_logprobs[t]``: log-prob of ``response_token_ids[t]`` under the distribution it
  was sampled from: ``log_softmax(logits / temperature)`` restricted and renormalised to the
  top-p nucleus when ``top_p < 1`` (vLLM ``processed_logprobs``).
* ``response``: the decoded response (special tokens skipped); the reward is computed on it.
* ``advantage``: ``(reward - group_mean) / (group_std + ADVANTAGE_EPS)`` over the prompt's K
  samples (see :func:`cropi.rollout.group_advantages`); ``zero_std`` groups (all rewards
  equal) have advantage 0. ``pass_rate``: the share of the K samples with reward > 0.
* ``seed``: the run seed (each sample's vLLM seed derives from it, the prompt id and the sample).
"""

from __future__ import annotations

import fcntl
import os
import re
import time
import typing
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from sketchstore.atomic import atomic_file

from .errors import BadConfigError

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
LOCK_NAME = ".rollout.lock"
_TMP_RE = re.compile(r"^\.part-.*\.tmp$")  # a part being written (sketchstore.atomic.temp_name)


@dataclass(kw_only=True)
class Trajectory:
    """One sampled response; see the module docstring for what each field means. The fields
    with defaults are descriptive or derived: a reader that needs only some columns (e.g. POPI)
    builds records from those."""

    prompt_id: str
    behaviour: str
    sample: int
    prompt: str = ""
    answer: str = ""
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    behaviour_logprobs: list[float]
    response: str = ""
    finish_reason: str = ""
    temperature: float
    top_p: float
    reward: float
    reward_parsed: bool = True
    advantage: float = 0.0
    group_mean: float = 0.0
    group_std: float = 0.0
    pass_rate: float = 0.0
    zero_std: bool = False
    seed: int = 0


_ARROW_TYPES = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_(),
                list[int]: pa.list_(pa.int32()), list[float]: pa.list_(pa.float32())}
TRAJECTORY_SCHEMA = pa.schema([(name, _ARROW_TYPES[kind]) for name, kind in typing.get_type_hints(Trajectory).items()])


def to_table(trajectories: Sequence[Trajectory]) -> pa.Table:
    """Trajectories as an Arrow table of :data:`TRAJECTORY_SCHEMA`."""
    return pa.Table.from_pylist([asdict(t) for t in trajectories], schema=TRAJECTORY_SCHEMA)


def from_rows(rows: Iterable[dict[str, Any]]) -> list[Trajectory]:
    """Trajectories from dict rows (e.g. ``read_trajectories(...).to_pylist()``); fields a row
    lacks take their defaults."""
    names = [f.name for f in fields(Trajectory)]
    return [Trajectory(**{n: row[n] for n in names if n in row}) for row in rows]


def trajectory_glob(path: str | os.PathLike) -> str:
    """The glob DuckDB's ``read_parquet`` takes for a trajectory store."""
    return str(Path(path) / f"{PART_PREFIX}*{PART_SUFFIX}")


def part_files(path: str | os.PathLike) -> list[Path]:
    """Committed part files of a store, oldest first (a plain Parquet file: itself)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        return []
    return sorted(q for q in p.iterdir() if q.name.startswith(PART_PREFIX) and q.name.endswith(PART_SUFFIX))


def read_trajectories(path: str | os.PathLike, behaviour: str | None = None,
                      columns: Sequence[str] | None = None) -> pa.Table:
    """All trajectories of a store (optionally one behaviour), sorted by
    (behaviour, prompt_id, sample). Raises BadConfigError when ``path`` is not a store."""
    p = Path(path)
    if not p.exists():
        raise BadConfigError(f"{p}: trajectory store does not exist")
    files = part_files(p)
    schema = TRAJECTORY_SCHEMA if columns is None else pa.schema([TRAJECTORY_SCHEMA.field(c) for c in columns])
    if not files:
        return schema.empty_table()
    import pyarrow.dataset as ds

    try:
        for part in files:
            missing = [c for c in schema.names if c not in pq.read_schema(part).names]
            if missing:
                raise BadConfigError(f"{part}: trajectories lack column(s) {', '.join(missing)}")
        dataset = ds.dataset([str(f) for f in files], schema=TRAJECTORY_SCHEMA, format="parquet")
        flt = ds.field("behaviour") == behaviour if behaviour is not None else None
        table = dataset.to_table(columns=list(schema.names), filter=flt)
    except (OSError, pa.ArrowException) as err:
        raise BadConfigError(f"{p}: unreadable trajectory part ({str(err).splitlines()[0]})") from None
    keys = [k for k in ("behaviour", "prompt_id", "sample") if k in schema.names]
    return table.sort_by([(k, "ascending") for k in keys]) if keys else table


def groups_by_prompt(rows: pa.Table | Iterable[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Rows grouped by (prompt_id, behaviour), each group sorted by sample."""
    if isinstance(rows, pa.Table):
        rows = rows.to_pylist()
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["prompt_id"], row["behaviour"]), []).append(row)
    for group in groups.values():
        group.sort(key=lambda r: r["sample"])
    return groups


class PartWriter:
    """Writes one committed part per call, named so that parts sort in the order written."""

    def __init__(self, out: Path):
        self.out = out
        self.seq = 0

    def write(self, trajectories: Sequence[Trajectory]) -> Path:
        name = f"{PART_PREFIX}{time.time_ns():020d}-{os.getpid()}-{self.seq:05d}{PART_SUFFIX}"
        self.seq += 1
        table = to_table(trajectories)
        with atomic_file(self.out / name) as handle:
            pq.write_table(table, handle)
        return self.out / name


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Exclusive write access to the store ``out``; removes parts left half-written by crashed writers."""
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadConfigError(f"{out}: another rollout is writing to this store") from None
        for q in out.iterdir():  # under the lock no other writer exists: temporary files are garbage
            if _TMP_RE.match(q.name):
                q.unlink(missing_ok=True)
        yield
    finally:
        fh.close()
