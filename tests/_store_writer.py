"""A resumable writer for the crash and concurrency tests, run in child processes.

Kept small (the store and torch only) so a forkserver can preload it and children start at once.
Each id's sketch depends only on the id, so any interleaving of writers and kills must end in
exactly the rows an uninterrupted writer stores.
"""

from __future__ import annotations

import os
import random
import signal

import torch

import sketchstore.backend
from sketchstore.store import SketchBatch, SketchStore

DIM = 32
KILL_POINTS = ("manifest", "before-rename", "after-rename")


def rows(ids: list[str], dim: int = DIM) -> SketchBatch:
    """Deterministic sketches (seeded by the number after the last ``-`` of each id) and metadata."""
    seeds = [int(i.rsplit("-", 1)[-1]) for i in ids]
    x = torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return SketchBatch(ids=list(ids), sketches=x, grad_norms=x.norm(dim=1).tolist(), n_tokens=[3] * len(ids),
                       metadata=[{"difficulty": s % 3} for s in seeds])


def fill(store: SketchStore, ids: list[str], flush: int) -> None:
    for lo in range(0, len(ids), flush):
        store.append("c0", "train", rows(ids[lo:lo + flush], store.spec.dim))


def _die_at(point: str, nth: int) -> None:
    """SIGKILL this process at the ``nth`` commit's ``point`` (inside the local commit lock)."""
    calls = {"n": 0}

    def due() -> bool:
        calls["n"] += 1
        return calls["n"] == nth

    if point == "manifest":
        real_write = sketchstore.backend.pq.write_table

        def write_table(table, where, *args, **kwargs):
            if due():
                os.kill(os.getpid(), signal.SIGKILL)
            return real_write(table, where, *args, **kwargs)

        sketchstore.backend.pq.write_table = write_table
        return
    real_rename = os.rename

    def rename(src, dst):
        if point == "before-rename" and due():
            os.kill(os.getpid(), signal.SIGKILL)
        real_rename(src, dst)
        if point == "after-rename" and due():  # visible, but the directory entry not yet fsynced
            os.kill(os.getpid(), signal.SIGKILL)

    os.rename = rename


def resume_writer(env: dict, url: str, ids: list[str], flush: int, seed: int,
                  kill_at: tuple[str, int] | None = None) -> None:
    """Store every id of ``ids`` not yet stored (in a seeded order), ``flush`` rows per part."""
    os.environ.update(env)
    if kill_at is not None:
        _die_at(*kill_at)
    store = SketchStore.open(url, writable=True)
    done = store.existing_ids("c0", "train")
    todo = [i for i in ids if i not in done]
    random.Random(seed).shuffle(todo)
    fill(store, todo, flush)
