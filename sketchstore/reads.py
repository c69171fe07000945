"""Read planning: which rows of which part to read, in storage order, and running the reads.

A plan is a list of :class:`ReadTask` (one part, a chunk-aligned range of its rows, gaps for
excluded ids allowed). Every reader of a split goes through it: ``SketchStore.iter_blocks``
(reader threads of this process) and ``scoring.score`` (any executor: threads, processes, or
a Dask client). :func:`ordered_results` runs one function over the tasks on an executor with
a bounded number in flight and yields the results in plan order.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

PLAN_COLUMNS = ("id", "part", "row", "sketch_norm")


@dataclass(frozen=True)
class ReadTask:
    """Rows ``rows`` (ascending) of part ``part``, with their ids and stored sketch norms."""

    part: str
    ids: tuple[str, ...]
    rows: np.ndarray
    norms: np.ndarray

    @property
    def span(self) -> tuple[int, int]:
        """The contiguous row range [first, last) that covers the task."""
        return int(self.rows[0]), int(self.rows[-1]) + 1


def plan_reads(manifest: pa.Table, block_rows: int, exclude: set[str] | None = None) -> list[ReadTask]:
    """Tasks of the manifest's rows (columns ``PLAN_COLUMNS``), grouped by part and by
    ``row // block_rows`` (so a task reads whole aligned chunks when ``block_rows`` is a multiple
    of the chunk size), in storage order; ids in ``exclude`` are left out."""
    groups: dict[tuple[str, int], list[tuple[int, str, float]]] = {}
    if manifest.num_rows:
        for key, part, row, norm in zip(*(manifest.column(c).to_pylist() for c in PLAN_COLUMNS)):
            if exclude is None or key not in exclude:
                groups.setdefault((part, row // block_rows), []).append((row, key, norm))
    tasks = []
    for part, index in sorted(groups):
        rows = sorted(groups[(part, index)])
        tasks.append(ReadTask(part, tuple(key for _, key, _ in rows), np.array([r for r, _, _ in rows], dtype=np.int64),
                              np.array([n for _, _, n in rows], dtype=np.float32)))
    return tasks


def ordered_results(executor: Executor | Any, fn: Callable[..., Any], tasks: Iterable[ReadTask], *args: Any,
                    window: int) -> Iterator[Any]:
    """``fn(task, *args)`` for each task, submitted through ``executor.submit`` (a
    ``concurrent.futures`` executor or a ``dask.distributed.Client``) with at most ``window``
    in flight; results in task order. Pending work is cancelled if the caller stops early."""
    tasks = iter(tasks)
    pending: deque = deque()
    try:
        for task in tasks:
            pending.append(executor.submit(fn, task, *args))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
