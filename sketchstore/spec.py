"""The projection spec: everything that decides what a sketch means.

Two sketches can be compared only when their specs are equal; the store records its
spec once and refuses rows, reads and scores made under another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Iterable

from .errors import BadInputError, SpecMismatchError
from .options import option

STORAGE_DTYPES = ("float16", "bfloat16", "float32")
PROJECTION_MODES = ("sparse", "dense", "factored")
DEFAULT_DIM = 8192
DEFAULT_SEED = 0
DEFAULT_KEEP_RATIO = 1.0


def param_spec_hash(named_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> str:
    """Order-independent hash of the (parameter name, shape) list a gradient covers."""
    items = sorted((name, tuple(int(s) for s in shape)) for name, shape in named_shapes)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ProjectionSpec:
    """How gradients become sketches.

    dim: sketch length k. seed: base seed; each parameter's projection is seeded from
    (seed, parameter name). mode: ``sparse`` (+-1 hashing), ``dense`` (Gaussian) or ``factored`` (per-layer
    Kronecker projections computed from activations and output gradients, see factored.py).
    keep_ratio: fraction of gradient coordinates kept before projecting (paper: ~0.1).
    dtype: storage dtype of sketches (they are always accumulated in float32).
    param_hash: hash of the parameter names and shapes the gradients cover ("" = not set).
    """

    dim: int = option(DEFAULT_DIM, "Sketch length k.")
    seed: int = option(DEFAULT_SEED, "Projection seed (each parameter's projection is seeded from it and its name).")
    mode: str = option("sparse", "How gradients are projected (see README: What a sketch is).", flag="projection",
                       choices=PROJECTION_MODES)
    keep_ratio: float = option(DEFAULT_KEEP_RATIO, "Fraction of coordinates kept before projecting (paper: ~0.1).")
    dtype: str = option("float16", "Storage dtype of sketches.", choices=STORAGE_DTYPES)
    param_hash: str = option("", "Hash of the parameter names and shapes (filled in by a build).")

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or self.dim < 1:
            raise BadInputError(f"projection dim must be a positive integer, got {self.dim!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise BadInputError(f"projection seed must be a non-negative integer, got {self.seed!r}")
        if self.mode not in PROJECTION_MODES:
            raise BadInputError(f"projection mode must be one of {PROJECTION_MODES}, got {self.mode!r}")
        if not 0.0 < float(self.keep_ratio) <= 1.0:
            raise BadInputError(f"keep ratio must be in (0, 1], got {self.keep_ratio!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise BadInputError(f"sketch dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ProjectionSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def check_compatible(self, other: "ProjectionSpec", what: str = "sketches") -> None:
        """Raise SpecMismatchError naming every field where ``other`` differs from self."""
        mine, theirs = self.to_dict(), other.to_dict()
        diffs = [f"{k} {theirs[k]!r} != store {mine[k]!r}" for k in mine if mine[k] != theirs[k]]
        if diffs:
            raise SpecMismatchError(f"{what} do not match the store's projection spec: " + "; ".join(diffs))
