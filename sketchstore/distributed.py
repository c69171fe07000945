"""Dask clusters for scoring: ``score(store, train, vals, options, executor=client)``.

A ``dask.distributed.Client`` is one more executor for ``scoring.score``: the store plans the
reads (reads.py), each task (``scoring.TASK_CHUNKS`` chunks of one part) is sent with the
store's location and its row numbers, each worker opens the store itself and reads its rows,
and only the per-row scores come back; validation targets, bookkeeping and writes stay on the
calling process. The validation matrix (k x number of sets) is sent to every worker once. The
store must therefore be readable by every worker under the same name: a directory on a shared
filesystem, or an object-storage URL, on a real cluster. This module only makes executors:
Dask clients (:func:`dask_client`) and, for ``sketch score``, a thread pool (:func:`scoring_executor`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from .errors import BadInputError

if TYPE_CHECKING:
    from distributed import Client

CONNECT_TIMEOUT_S = 10.0


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


@contextmanager
def scoring_executor(threads: int | None = None, scheduler: str | None = None,
                     workers: int | None = None) -> Iterator["ThreadPoolExecutor | Client | None"]:
    """Where ``score`` runs its products: a pool of ``threads`` threads, a Dask cluster
    (:func:`dask_client`), or (given none) None, this process's reader threads."""
    if threads is not None:
        if scheduler is not None or workers is not None:
            raise BadInputError("give either a number of scoring threads or a Dask cluster, not both")
        if threads < 1:
            raise BadInputError(f"the number of scoring threads must be >= 1, got {threads}")
        with ThreadPoolExecutor(max_workers=threads) as pool:
            yield pool
        return
    with dask_client(scheduler, workers) as client:
        yield client
