"""Streaming, incremental influence scores of train sketches against validation sets.

Each validation set reduces to one target vector t, so a train row x scores ``f(x) . t``:

=========  =============  ===========================================================
metric     aggregation    meaning
=========  =============  ===========================================================
cosine     mean (default) mean over validation rows v of cos(x, v);  t = mean(v/|v|)
cosine     sum            cos(x, sum of v): alignment with the summed validation gradient
inner      mean           mean over v of <x, v>;                    t = mean(v)
inner      sum            <x, sum of v>
=========  =============  ===========================================================

For cosine, f(x) = x/|x| (0 for a zero sketch: a zero gradient aligns with nothing; the
store keeps rows unit-normalised, so this costs nothing), and
validation rows with a zero sketch are left out of the target. Train rows are streamed one
chunk at a time, so memory does not grow with the store. Scores are written to the store
keyed by (train checkpoint, train split, validation set, metric, aggregation) and a
fingerprint of the validation rows; re-scoring computes only rows not scored under that key.

Where the products run is the caller's choice: in this process (the store's reader threads,
the default), or on any ``executor`` with a ``submit`` method (a ``concurrent.futures``
thread or process pool, or a ``dask.distributed.Client``: sketchstore.distributed). Every
path reads through the store's one read plan (reads.py); bookkeeping and writes stay here.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from . import catalog
from .errors import BadInputError
from .reads import ReadTask, ordered_results
from .store import SketchStore

#: Chunks of one part per task on an executor (each task opens the store and reads its rows).
TASK_CHUNKS = 8
#: Tasks in flight per executor, beyond which submission waits for the oldest result.
TASKS_IN_FLIGHT = 64

METRICS = ("cosine", "inner")
AGGREGATIONS = ("mean", "sum")


@dataclass(frozen=True)
class SplitRef:
    """A (checkpoint, split) pair, written ``CKPT:SPLIT`` on the command line."""

    checkpoint: str
    split: str

    @classmethod
    def parse(cls, text: str) -> "SplitRef":
        checkpoint, sep, split = text.strip().partition(":")
        if not sep or not checkpoint or not split:
            raise BadInputError(f"expected CHECKPOINT:SPLIT, got {text!r}")
        return cls(checkpoint, split)

    @classmethod
    def parse_list(cls, text: str) -> list["SplitRef"]:
        refs = [cls.parse(part) for part in text.split(",") if part.strip()]
        if not refs:
            raise BadInputError("no validation sets given (expected CKPT:SPLIT[,CKPT:SPLIT...])")
        return refs

    def __str__(self) -> str:
        return f"{self.checkpoint}:{self.split}"


@dataclass(frozen=True)
class ScoreOptions:
    metric: str = "cosine"
    aggregation: str = "mean"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise BadInputError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.aggregation not in AGGREGATIONS:
            raise BadInputError(f"unknown aggregation {self.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")


@dataclass
class ScoreReport:
    scored: int
    already_scored: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Target:
    """One validation set reduced to its target vector."""

    ref: SplitRef
    vector: torch.Tensor
    fingerprint: str
    n_rows: int


def validation_target(store: SketchStore, ref: SplitRef, options: ScoreOptions) -> Target:
    """Read a validation set's sketches and reduce them to one target vector."""
    ids, sketches = store.read(ref.checkpoint, ref.split)
    if options.metric == "cosine":
        norms = sketches.norm(dim=1, keepdim=True)
        keep = norms.squeeze(1) > 0
        if not keep.any():
            raise BadInputError(f"validation set {ref} has only zero sketches; cosine scores are undefined")
        sketches = sketches[keep] / norms[keep]
    vector = sketches.sum(0)
    if options.aggregation == "mean":
        vector = vector / sketches.shape[0]
    elif options.metric == "cosine":
        vector = vector / vector.norm().clamp_min(torch.finfo(torch.float32).tiny)
    digest = hashlib.sha256("\n".join(sorted(ids)).encode())
    digest.update(vector.numpy().tobytes())
    return Target(ref, vector, digest.hexdigest()[:16], len(ids))


def score_key(train: SplitRef, target: Target, options: ScoreOptions) -> str:
    text = f"{train}|{target.ref}|{options.metric}|{options.aggregation}|{target.fingerprint}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def scored_ids(store: SketchStore, train: SplitRef, target: Target, options: ScoreOptions) -> set[str]:
    return set(_read_key(store, score_key(train, target, options)))


def score_block(block: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n, k) sketches x (k, m) targets -> (n, m) scores. For cosine, pass unit rows."""
    return block @ targets


def score_task(task: ReadTask, source: "SketchStore | str", matrix: np.ndarray | torch.Tensor,
               unit: bool) -> np.ndarray:
    """On a worker: (rows, m) scores of one read task against the (k, m) target matrix.
    ``source`` is the open store (threads) or its location (other processes open it)."""
    store = source if isinstance(source, SketchStore) else SketchStore.open(source)
    return score_block(store.load(task, unit), torch.as_tensor(matrix)).numpy()


def scored_blocks(store: SketchStore, train: SplitRef, exclude: set[str], matrix: torch.Tensor, unit: bool,
                  executor: Any = None, task_rows: int | None = None) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(ids, (n, m) scores) per read task of ``train``, in storage order.

    Without ``executor``: the store's reader threads (``iter_blocks``). With one: a thread pool
    shares the open store; any other executor (processes, Dask) gets the store's location, and
    the matrix once (``scatter`` where the executor has it, as Dask does).
    """
    if executor is None:
        yield from store.iter_blocks(train.checkpoint, train.split, exclude=exclude, unit=unit,
                                     transform=lambda block: score_block(block, matrix))
        return
    tasks = store.plan_reads(train.checkpoint, train.split, exclude, task_rows or store.info.chunk_rows * TASK_CHUNKS)
    if isinstance(executor, ThreadPoolExecutor):
        source, targets = store, matrix
    else:
        source = str(store.path.resolve()) if isinstance(store.path, Path) else str(store.path)
        targets = matrix.numpy()
        if hasattr(executor, "scatter"):
            targets = executor.scatter(targets, broadcast=True)
    results = ordered_results(executor, score_task, tasks, source, targets, unit, window=TASKS_IN_FLIGHT)
    for task, scores in zip(tasks, results):
        yield list(task.ids), torch.from_numpy(scores)


def _check_same_objective(store: SketchStore, train: SplitRef, vals: Sequence[SplitRef]) -> None:
    """Refuse to compare sketches of different objectives (e.g. POPI train rows vs SFT validation rows)."""
    objectives = {}
    for ref in (train, *vals):
        table = store.manifest(ref.checkpoint, ref.split, columns=["objective"])
        objectives[ref] = set(table.column("objective").to_pylist()) if "objective" in table.column_names else set()
    mine = objectives[train]
    for ref in vals:
        if objectives[ref] and mine and objectives[ref] != mine:
            raise BadInputError(f"{ref} was built with objective {'/'.join(sorted(objectives[ref]))} but {train} "
                                f"with {'/'.join(sorted(mine))}; their sketches are not comparable")


def score(store: SketchStore, train: SplitRef, vals: Sequence[SplitRef], options: ScoreOptions = ScoreOptions(),
          progress: bool = True, executor: Any = None) -> ScoreReport:
    """Score every not-yet-scored row of ``train`` against each validation set; store the scores.

    ``executor`` (see :func:`scored_blocks`): where the products run, e.g. a
    ``ThreadPoolExecutor`` or a ``dask.distributed.Client``; by default, in this process.
    """
    start = time.perf_counter()
    store.require(train.checkpoint, train.split)
    _check_same_objective(store, train, vals)
    targets = [validation_target(store, ref, options) for ref in vals]
    done = [scored_ids(store, train, t, options) for t in targets]
    skip = set.intersection(*done) if done else set()
    total = store.keys()
    n_train = next(n for c, s, n in total if c == train.checkpoint and s == train.split)
    matrix = torch.stack([t.vector for t in targets], dim=1)
    columns: list[dict[str, list]] = [{"id": [], "score": []} for _ in targets]
    bar = tqdm(total=n_train - len(skip), desc=f"score {train}", unit="row", disable=not progress)
    unit = options.metric == "cosine"
    for ids, scores in scored_blocks(store, train, skip, matrix, unit, executor):
        for j, col in enumerate(columns):
            fresh = [i for i, key in enumerate(ids) if key not in done[j]] if done[j] else range(len(ids))
            col["id"].extend(ids[i] for i in fresh)
            col["score"].extend(scores[list(fresh), j].tolist())
        bar.update(len(ids))
    bar.close()
    for target, col in zip(targets, columns):
        n = len(col["id"])
        table = pa.table({
            "id": col["id"], "train_checkpoint": [train.checkpoint] * n, "train_split": [train.split] * n,
            "val_set": [str(target.ref)] * n, "metric": [options.metric] * n,
            "aggregation": [options.aggregation] * n, "val_fingerprint": [target.fingerprint] * n,
            "score": pa.array(col["score"], pa.float64()),
        })
        store.write_scores(score_key(train, target, options), table)
    scored = max((len(c["id"]) for c in columns), default=0)
    return ScoreReport(scored=scored, already_scored=len(skip), seconds=time.perf_counter() - start)


def load_scores(store: SketchStore, train: SplitRef, vals: Sequence[SplitRef],
                options: ScoreOptions = ScoreOptions()) -> dict[SplitRef, dict[str, float]]:
    """Stored scores per validation set for ``train``, under the current validation rows."""
    out = {}
    for ref in vals:
        target = validation_target(store, ref, options)
        scores = _read_key(store, score_key(train, target, options))
        if not scores:
            raise BadInputError(f"no scores for {train} against {ref} ({options.metric}/{options.aggregation}); run `sketch score` first")
        out[ref] = scores
    return out


def _read_key(store: SketchStore, key: str) -> dict[str, float]:
    """id -> score for one score key (empty when never scored)."""
    files = store.score_files(key)
    if not files:
        return {}
    _, rows = catalog.query(store, "SELECT id, any_value(score) FROM read_parquet("
                            + catalog.quote_list(files) + ") GROUP BY id")
    return dict(rows)
