"""Selecting train rows from stored scores, exporting the selection, pruning a dataset.

Several validation sets are fused into one ranking:

- ``rrf`` (default, as the CROPI reference): sum over sets of 1/rank of the row in that set.
- ``mean``: mean of the per-set scores (sensible when all sets use one metric).
- ``max``: the best per-set score.

Ties are broken by a hash of the id (:func:`tie_key`): reproducible, and unrelated to what ids
spell (breaking them by the id itself fills a selection's zero-score ties with whatever sorts first,
e.g. every ``arith-*`` prompt before any ``word-*`` one).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .data import read_rows, write_rows
from .errors import BadInputError
from .scoring import ScoreOptions, SplitRef, load_scores
from .store import SketchStore

FUSIONS = ("rrf", "mean", "max")


@dataclass(frozen=True)
class Selected:
    id: str
    score: float
    rank: int


def tie_key(key: str) -> bytes:
    """Order among rows of equal score: a hash of the id (stable across runs and machines)."""
    return hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest() + key.encode("utf-8")


def ranked(scores: Mapping[str, float], keys: Iterable[str] | None = None) -> list[str]:
    """``keys`` (default: all of ``scores``) best first, ties by :func:`tie_key`."""
    return sorted(scores if keys is None else keys, key=lambda i: (-scores[i], tie_key(i)))


def parse_top(text: str | float | int) -> float | int:
    """``0.1`` -> a fraction of rows; ``500`` -> a count. Errors name the value."""
    try:
        value = float(text)
    except (TypeError, ValueError) as err:
        raise BadInputError(f"--top must be a fraction in (0, 1] or a row count, got {text!r}") from err
    if 0 < value <= 1 and not (isinstance(text, int) or (isinstance(text, str) and text.isdigit())):
        return value
    if value >= 1 and value == int(value):
        return int(value)
    raise BadInputError(f"--top must be a fraction in (0, 1] or a row count, got {text!r}")


def fuse(per_set: Sequence[Mapping[str, float]], fusion: str = "rrf") -> dict[str, float]:
    """Combine per-validation-set scores (each id -> score) into one score per id."""
    if fusion not in FUSIONS:
        raise BadInputError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
    ids = set(per_set[0])
    for scores in per_set[1:]:
        ids &= set(scores)
    if fusion == "mean":
        return {i: sum(s[i] for s in per_set) / len(per_set) for i in ids}
    if fusion == "max":
        return {i: max(s[i] for s in per_set) for i in ids}
    fused = dict.fromkeys(ids, 0.0)
    for scores in per_set:
        for rank, key in enumerate(ranked(scores, ids), 1):
            fused[key] += 1.0 / rank
    return fused


def top_rows(scores: Mapping[str, float], top: float | int, exclude: Iterable[str] = ()) -> list[Selected]:
    """The best ``top`` rows (a fraction of the candidates, or a count), skipping ``exclude``."""
    excluded = set(exclude)
    candidates = ranked(scores, (key for key in scores if key not in excluded))
    count = max(1, round(top * len(candidates))) if isinstance(top, float) else top
    return [Selected(key, float(scores[key]), rank) for rank, key in enumerate(candidates[:count], 1)]


def select(store: SketchStore, train: SplitRef, vals: Sequence[SplitRef], top: float | int,
           options: ScoreOptions = ScoreOptions(), fusion: str = "rrf", exclude: Iterable[str] = ()) -> list[Selected]:
    """Top rows of ``train`` by stored (fused) influence against ``vals``."""
    per_set = load_scores(store, train, vals, options)
    return top_rows(fuse([per_set[ref] for ref in vals], fusion), top, exclude)


def export_selection(selected: Sequence[Selected], path: str | os.PathLike, extra: Mapping[str, object] | None = None) -> Path:
    """Write the selection (id, score, rank, and constant ``extra`` columns) to JSONL or Parquet."""
    rows = [{"id": s.id, "score": s.score, "rank": s.rank, **(extra or {})} for s in selected]
    return write_rows(rows, path)


def read_ids(path: str | os.PathLike) -> list[str]:
    """The ``id`` column of a JSONL/Parquet file (a selection or a dataset)."""
    return [row["id"] for row in read_rows(path, required=("id",))]


def prune(data: str | os.PathLike, keep: str | os.PathLike, out: str | os.PathLike) -> tuple[int, int]:
    """Write the rows of ``data`` whose id is in ``keep`` to ``out``, in their original order and
    with all their columns. Returns (kept, total)."""
    rows = read_rows(data, required=("id",))
    wanted = set(read_ids(keep))
    known = {row["id"] for row in rows}
    unknown = wanted - known
    if unknown:
        raise BadInputError(f"{keep}: {len(unknown)} ids are not in {data}, e.g. {sorted(unknown)[0]!r}")
    kept = [row for row in rows if row["id"] in wanted]
    write_rows(kept, out)
    return len(kept), len(rows)
