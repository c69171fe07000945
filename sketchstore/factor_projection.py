"""The seeded projections of factored sketches (factored.py): per weight matrix, CountSketch
factors P_row (k_r x m) and P_col (k_c x n) that shrink its gradient G to the block
P_row G P_col^T, then one sparse projection of all blocks and vectors to the sketch length.

Each factor is seeded by the spec's seed, its side and sizes and, per ``spec.factor_version``:
the parameter's name (version 1, the default and what stores written before the field used), or
for the column factor of version 2 the parent module's name instead (``model.layers.3.self_attn`` for
``model.layers.3.self_attn.q_proj.weight``), so sibling layers of one input width share P_col
and an input they share (q/k/v, gate/up) is projected once per pass (factored_stream.py). A
sketch does not depend on which other parameters are selected, nor on the batch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .projection import SparseProjector
from .seeds import stable_seed
from .spec import ProjectionSpec


def factor_dims(shape: Sequence[int], side: int) -> tuple[int, int]:
    """(k_row, k_col) of a weight matrix of ``shape`` (m, n) whose block sides are at most ``side``
    (a side that fits is not projected)."""
    return min(int(shape[0]), side), min(int(shape[1]), side)


def apply_codes(x: torch.Tensor, codes: torch.Tensor | None, k: int) -> torch.Tensor:
    """CountSketch along the last dim of ``x``: (..., size) -> (..., k); identity for None."""
    if codes is None:
        return x
    acc = x.new_zeros(*x.shape[:-1], 2 * k)
    acc.index_add_(x.dim() - 1, codes, x)
    return acc[..., :k] - acc[..., k:]


class FactorProjection:
    """Factors of the weight matrices ``matrices`` (names of ``shapes``) and the final projection."""

    def __init__(self, spec: ProjectionSpec, shapes: dict[str, tuple[int, ...]], matrices: Sequence[str],
                 device: torch.device) -> None:
        self.spec = spec
        self.shapes = shapes
        self.matrices = list(matrices)
        self.device = device
        self.final = SparseProjector(ProjectionSpec(dim=spec.dim, seed=stable_seed(spec.seed, "factored", "final"),
                                                    mode="sparse"))
        self._codes: dict[tuple, torch.Tensor | None] = {}

    def seed_name(self, name: str, side: str) -> str:
        """The name a factor is seeded from: the parameter's, or (version 2, column side) its
        parent module's, e.g. ``model.layers.0.mlp`` for ``model.layers.0.mlp.up_proj.weight``."""
        if side == "col" and self.spec.factor_version >= 2:
            return name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""
        return name

    def codes(self, name: str, side: str) -> torch.Tensor | None:
        """CountSketch codes ``h + k * [sign < 0]`` (int64, one per row (side "row") or column
        ("col") of matrix ``name``) of its factor, or None when that side is not projected; one
        tensor per seed (matrices sharing a factor get the same object)."""
        m, n = self.shapes[name]
        k_r, k_c = self.block_shape(name)
        size, k = (m, k_r) if side == "row" else (n, k_c)
        key = (self.seed_name(name, side), side, size, k)
        if key not in self._codes:
            if k >= size:
                self._codes[key] = None
            else:
                gen = torch.Generator().manual_seed(stable_seed(self.spec.seed, "factored", *key))
                self._codes[key] = torch.randint(0, 2 * k, (size,), generator=gen).to(self.device)
        return self._codes[key]

    def factor(self, name: str, side: str) -> torch.Tensor | None:
        """The factor as a dense (k, size) matrix (one +-1 per column), or None for identity:
        P_row (side "row") or P_col ("col") of matrix ``name``. For checks; never used to project."""
        codes = self.codes(name, side)
        if codes is None:
            return None
        k = self.block_shape(name)[0 if side == "row" else 1]
        codes = codes.cpu()
        mat = torch.zeros(k, codes.numel())
        mat[codes % k, torch.arange(codes.numel())] = torch.where(codes < k, 1.0, -1.0)
        return mat

    def block_shape(self, name: str) -> tuple[int, int]:
        return factor_dims(self.shapes[name], self.spec.factor_side)

    def reference_blocks(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Intermediate blocks P_row G P_col^T (matrices) / exact vectors of explicit gradients
        (name -> (B, *shape)): what the factored path computes without materialising G."""
        out = {}
        for name, grad in grads.items():
            grad = grad.float()
            if name in self.matrices:
                k_r, k_c = self.block_shape(name)
                grad = apply_codes(grad, self.codes(name, "col"), k_c)
                grad = apply_codes(grad.transpose(1, 2), self.codes(name, "row"), k_r).transpose(1, 2).contiguous()
            out[name] = grad
        return out

    def reference(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, dim) sketches of explicit per-example gradients under the same seeded factors."""
        return self.final.project(self.reference_blocks(grads))
