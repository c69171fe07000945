"""The projection spec: everything that decides what a sketch means.

Two sketches can be compared only when their specs are equal; the store records its
spec once and refuses rows, reads and scores made under another.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Iterable

from .errors import BadInputError, SpecMismatchError
from .options import option

STORAGE_DTYPES = ("float16", "bfloat16", "float32")
PROJECTION_MODES = ("sparse", "dense", "factored")
DEFAULT_DIM = 8192
DEFAULT_SEED = 0
DEFAULT_KEEP_RATIO = 1.0
#: Default largest block side of factored sketches: the smallest power of two >= sqrt(FACTOR_SIDE_MULTIPLIER * dim)
#: (128 at dim 8192, 256 at 32768); chosen against exact gradients and Bergson in
#: benchmarks/vs_bergson.py (benchmarks/README.md).
FACTOR_SIDE_MULTIPLIER = 2
#: Block side of factored stores written before the spec had ``factor_side`` (their rule: 2**ceil(log2(sqrt(8 dim)))).
LEGACY_FACTOR_SIDE_MULTIPLIER = 8
#: How factored sketches build their factors (factor_projection.FACTOR_RULES): 1 = random buckets, every factor seeded
#: per parameter name; 2 = the same with column factors per parent module and input width, shared by q/k/v and gate/up
#: (their input is projected once per pass); 3 = folded buckets (coordinate i to bucket i mod k, random signs) and a
#: folded final hash, per parameter. Measured side by side (4-layer model, 3 seeds, benchmarks/README.md): 3 is the
#: most faithful (Spearman vs exact 0.992 against 0.987 for 1) and the fastest, so it is the default.
FACTOR_VERSIONS = (1, 2, 3)
DEFAULT_FACTOR_VERSION = 3
#: Version of factored stores written before the spec had ``factor_version``.
LEGACY_FACTOR_VERSION = 1


def param_spec_hash(named_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> str:
    """Order-independent hash of the (parameter name, shape) list a gradient covers."""
    items = sorted((name, tuple(int(s) for s in shape)) for name, shape in named_shapes)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def power_of_two_above(x: float) -> int:
    """2 ** ceil(log2(sqrt(x))): the smallest power of two at least sqrt(x) (at least 1)."""
    return 1 << max(0, math.ceil(math.log2(math.sqrt(x))))


def default_factor_side(dim: int) -> int:
    """Default largest block side of factored sketches of length ``dim`` (see FACTOR_SIDE_MULTIPLIER)."""
    return power_of_two_above(FACTOR_SIDE_MULTIPLIER * dim)


@dataclass(frozen=True)
class ProjectionSpec:
    """How gradients become sketches.

    dim: sketch length k. seed: base seed; each parameter's projection is seeded from
    (seed, parameter name). mode: ``sparse`` (+-1 hashing), ``dense`` (Gaussian) or ``factored`` (per-layer
    Kronecker projections computed from activations and output gradients, see factored.py).
    keep_ratio: fraction of gradient coordinates kept before projecting (paper: ~0.1).
    dtype: storage dtype of sketches (they are always accumulated in float32).
    factor_side: factored mode only (0 otherwise): the largest side of a weight matrix's
    intermediate block (0 = the default for ``dim``, :func:`default_factor_side`).
    factor_version: factored mode only (0 otherwise): how its factors are built, one of
    FACTOR_VERSIONS (0 = DEFAULT_FACTOR_VERSION; stores from before the field read as LEGACY_FACTOR_VERSION).
    param_hash: hash of the parameter names and shapes the gradients cover ("" = not set).
    """

    dim: int = option(DEFAULT_DIM, "Sketch length k.")
    seed: int = option(DEFAULT_SEED, "Projection seed (each parameter's projection is seeded from it and its name).")
    mode: str = option("sparse", "How gradients are projected (see README: What a sketch is).", flag="projection",
                       choices=PROJECTION_MODES)
    keep_ratio: float = option(DEFAULT_KEEP_RATIO, "Fraction of coordinates kept before projecting (paper: ~0.1).")
    dtype: str = option("float16", "Storage dtype of sketches.", choices=STORAGE_DTYPES)
    factor_side: int = option(0, "Factored mode: largest side of each weight matrix's intermediate block, a power of "
                                 "two (0: the default for --dim; larger is more faithful and slower).")
    factor_version: int = option(0, f"Factored mode: how factors are built (0: {DEFAULT_FACTOR_VERSION}, folded "
                                    "buckets; 1: random buckets, what stores before the field used; 2: random buckets, "
                                    "column factors shared per module).")
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
        side = self.factor_side
        if not isinstance(side, int) or side < 0 or side & (side - 1):
            raise BadInputError(f"factor side must be 0 or a power of two, got {side!r}")
        if self.mode != "factored" and side:
            raise BadInputError(f"factor side {side} applies to --projection factored only, not {self.mode}")
        if self.mode == "factored" and not side:
            object.__setattr__(self, "factor_side", default_factor_side(self.dim))
        version = self.factor_version
        if not isinstance(version, int) or version not in (0, *FACTOR_VERSIONS):
            raise BadInputError(f"factor version must be 0 or one of {FACTOR_VERSIONS}, got {version!r}")
        if self.mode != "factored" and version:
            raise BadInputError(f"factor version {version} applies to --projection factored only, not {self.mode}")
        if self.mode == "factored" and not version:
            object.__setattr__(self, "factor_version", DEFAULT_FACTOR_VERSION)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ProjectionSpec":
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        if data.get("mode") == "factored" and "factor_side" not in data:  # a store from before factor_side
            data["factor_side"] = power_of_two_above(LEGACY_FACTOR_SIDE_MULTIPLIER * int(data.get("dim", DEFAULT_DIM)))
        if data.get("mode") == "factored" and "factor_version" not in data:  # a store from before factor_version
            data["factor_version"] = LEGACY_FACTOR_VERSION
        return cls(**data)

    def check_compatible(self, other: "ProjectionSpec", what: str = "sketches") -> None:
        """Raise SpecMismatchError naming every field where ``other`` differs from self."""
        mine, theirs = self.to_dict(), other.to_dict()
        diffs = [f"{k} {theirs[k]!r} != store {mine[k]!r}" for k in mine if mine[k] != theirs[k]]
        if diffs:
            raise SpecMismatchError(f"{what} do not match the store's projection spec: " + "; ".join(diffs))
