"""Which prompts each GRPO step trains on: a pool drawn without replacement, resumable."""

from __future__ import annotations

import random
from typing import Any, Sequence

from sketchstore.seeds import stable_seed

from .errors import BadConfigError

SEED_BITS = 62


def derive_seed(*parts: Any) -> int:
    """A trainer seed derived from ``parts`` (prompt order, sampling and evaluation seeds)."""
    return stable_seed("cropi-grpo", *parts, bits=SEED_BITS)


class PoolSampler:
    """Draws prompts from a pool without replacement: a seeded permutation per epoch.

    ``next(n)`` returns the next n rows (crossing into a new epoch when the pool runs out, so
    a pool smaller than n repeats prompts within a step). ``state_dict``/``load_state_dict``
    and ``rows`` make it resumable.
    """

    def __init__(self, rows: Sequence[dict[str, Any]], seed: int = 0):
        if not rows:
            raise BadConfigError("the prompt pool is empty")
        self.rows = list(rows)
        self.seed = int(seed)
        self.epoch = 0
        self.pos = 0
        self._perm: list[int] | None = None

    def _permutation(self) -> list[int]:
        if self._perm is None:
            perm = list(range(len(self.rows)))
            random.Random(derive_seed("pool", self.seed, self.epoch)).shuffle(perm)
            self._perm = perm
        return self._perm

    def next(self, n: int) -> list[dict[str, Any]]:
        out = []
        while len(out) < n:
            if self.pos >= len(self.rows):
                self.epoch += 1
                self.pos = 0
                self._perm = None
            take = min(n - len(out), len(self.rows) - self.pos)
            perm = self._permutation()
            out.extend(self.rows[i] for i in perm[self.pos: self.pos + take])
            self.pos += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.pos = int(state["seed"]), int(state["epoch"]), int(state["pos"])
        self._perm = None
