"""Scoring on a Dask cluster: the same scores as ``score``, with the products spread over workers.

``score(store, train, vals, options, client=client)`` keeps everything but the products on
the calling process: validation targets, the rows already scored, and the writes through
``SketchStore.write_scores``. The train rows are cut into tasks along the store's chunks
(``TASK_CHUNKS`` chunks of one part per task); a task carries the store path, the part name
and its row numbers, each worker opens the store itself and reads its rows, and only the
per-row scores come back. The validation matrix (k x number of sets) is sent to every worker
once. The store must therefore be readable by every worker under the same name: a directory
on a shared filesystem, or an object-storage URL, on a real cluster.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from .errors import BadInputError
from .scoring import SplitRef, score_block
from .store import SketchStore

if TYPE_CHECKING:
    from distributed import Client

CONNECT_TIMEOUT_S = 10.0
TASK_CHUNKS = 8


@contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None,
                timeout: float | None = None) -> Iterator["Client | None"]:
    """A Dask client connected to the scheduler at ``scheduler`` (e.g. ``tcp://host:8786``), or to a
    LocalCluster of ``workers`` single-threaded worker processes started (and stopped) here.
    Given neither, yields None: ``score`` then runs in this process. ``timeout`` (default
    ``CONNECT_TIMEOUT_S``) bounds the wait for the scheduler and for its first worker."""
    if scheduler is not None and workers is not None:
        raise BadInputError("give either a Dask scheduler address or a number of local Dask workers, not both")
    if scheduler is None and workers is None:
        yield None
        return
    from distributed import Client, LocalCluster

    if workers is not None:
        if workers < 1:
            raise BadInputError(f"the number of Dask workers must be >= 1, got {workers}")
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            yield client
        return
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    try:
        client = Client(scheduler, timeout=timeout)
    except (OSError, ValueError) as err:  # refused/timed out (OSError, TimeoutError) or a malformed address
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadInputError(f"cannot reach the Dask scheduler at {scheduler}: {detail}") from err
    with client:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError as err:
            raise BadInputError(f"the Dask scheduler at {scheduler} has no workers (none joined within {timeout:g} s)") from err
        yield client


def row_tasks(store: SketchStore, checkpoint: str, split: str, exclude: set[str],
              task_rows: int) -> list[tuple[str, list[str], np.ndarray, np.ndarray]]:
    """(part, ids, rows, sketch norms) per task: rows of one part in ``task_rows``-aligned ranges, in storage order."""
    manifest = store.manifest(checkpoint, split, columns=["id", "part", "row", "sketch_norm"])
    groups: dict[tuple[str, int], list[tuple[int, str, float]]] = {}
    for key, part, row, norm in zip(*(manifest.column(c).to_pylist() for c in ("id", "part", "row", "sketch_norm"))):
        if key not in exclude:
            groups.setdefault((part, row // task_rows), []).append((row, key, norm))
    tasks = []
    for part, index in sorted(groups):
        rows = sorted(groups[(part, index)])
        tasks.append((part, [key for _, key, _ in rows], np.array([r for r, _, _ in rows], dtype=np.int64),
                      np.array([n for _, _, n in rows], dtype=np.float32)))
    return tasks


def score_rows(path: str, part: str, rows: np.ndarray, norms: np.ndarray | None, matrix: np.ndarray) -> np.ndarray:
    """On a worker: (len(rows), m) scores of the given rows of one part against the (k, m) target matrix.

    ``norms`` rescales the stored unit rows (inner metric); None keeps them unit (cosine).
    """
    store = SketchStore.open(path)
    first, last = int(rows[0]), int(rows[-1]) + 1
    block = store.read_rows(part, first, last)
    if len(rows) != last - first:
        block = block.index_select(0, torch.from_numpy(rows - first))
    if norms is not None:
        block.mul_(torch.from_numpy(norms)[:, None])
    return score_block(block, torch.from_numpy(matrix)).numpy()


def scored_blocks(client: "Client", store: SketchStore, train: SplitRef, exclude: set[str], matrix: torch.Tensor, unit: bool,
                  task_rows: int | None = None) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(ids, (n, m) scores) per task, in storage order, computed on the client's workers.

    Drop-in for ``store.iter_blocks(..., transform=score_block)`` in ``score``.
    """
    tasks = row_tasks(store, train.checkpoint, train.split, exclude, task_rows or store.info.chunk_rows * TASK_CHUNKS)
    if not tasks:
        return
    path = str(store.path.resolve()) if isinstance(store.path, Path) else str(store.path)
    targets = client.scatter(matrix.numpy(), broadcast=True)
    pending = deque(client.submit(score_rows, path, part, rows, None if unit else norms, targets, pure=False)
                    for part, _, rows, norms in tasks)
    try:
        for _, ids, _, _ in tasks:
            yield ids, torch.from_numpy(pending.popleft().result())
    finally:
        if pending:
            client.cancel(list(pending))
