"""The seeded projections of factored sketches (factored.py): per weight matrix, CountSketch
factors P_row (k_r x m) and P_col (k_c x n) that shrink its gradient G to the block
P_row G P_col^T, then one sparse projection of all blocks and vectors to the sketch length.

A factor sends each coordinate i of its side to one bucket with a random sign. ``spec.factor_version``
says how (FACTOR_RULES):

* buckets ``hashed`` (versions 1, 2): a seeded random bucket per coordinate, applied with one
  ``index_add_`` along the last dimension;
* buckets ``folded`` (version 3, the default): bucket ``i mod k``, applied as a sign multiply and
  a multiply-add per k-wide slice of the side, 2.5-5x faster than the ``index_add_`` at widths 256-768
  (benchmarks/README.md). Buckets are balanced (each gets ceil or floor of size / k coordinates)
  and only the signs are random; inner products stay unbiased (E[P^T P] = I over the signs).

Each factor is seeded by the spec's seed, its side and sizes and the parameter's name or, for the
column factor of version 2, the parent module's name (``model.layers.3.self_attn`` for
``model.layers.3.self_attn.q_proj.weight``), so sibling layers of one input width share P_col
and an input they share (q/k/v, gate/up) is projected once per pass (factored_stream.py). A
sketch does not depend on which other parameters are selected, nor on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .projection import SparseProjector
from .seeds import stable_seed
from .spec import FACTOR_VERSIONS, ProjectionSpec


@dataclass(frozen=True)
class FactorRule:
    """How one factor_version builds its factors: bucket rule and whether column factors are per module."""

    buckets: str  # "hashed" or "folded": the factors' buckets and the final hash's
    shared_columns: bool


FACTOR_RULES = {1: FactorRule("hashed", False), 2: FactorRule("hashed", True), 3: FactorRule("folded", False)}
assert tuple(FACTOR_RULES) == FACTOR_VERSIONS


def factor_dims(shape: Sequence[int], side: int) -> tuple[int, int]:
    """(k_row, k_col) of a weight matrix of ``shape`` (m, n) whose block sides are at most ``side``
    (a side that fits is not projected)."""
    return min(int(shape[0]), side), min(int(shape[1]), side)


class CountSketch:
    """One factor: coordinate i of a side of ``size`` goes to ``bucket[i]`` in [0, k) with sign ``sign[i]``."""

    def __init__(self, size: int, k: int, rule: str, generator: torch.Generator, device: torch.device) -> None:
        self.size, self.k, self.rule = size, k, rule
        if rule == "hashed":
            codes = torch.randint(0, 2 * k, (size,), generator=generator)
            self.bucket, negative = codes % k, codes >= k
            self.codes = codes.to(device)  # h + k * [sign < 0]: one index_add_ into 2k slots
        else:
            self.bucket = torch.arange(size) % k
            negative = torch.randint(0, 2, (size,), generator=generator).bool()
        self.sign = torch.where(negative, -1.0, 1.0).to(device)
        self.bucket = self.bucket.to(device)
        self._relative_slices: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}

    @property
    def lead(self) -> torch.Tensor | None:
        """The signs :meth:`apply_led` leaves out, one per bucket (folded factors: the first
        slice's), or None when it leaves none out (hashed factors)."""
        return None if self.rule == "hashed" else self.sign[:self.k]

    def apply_led(self, x: torch.Tensor) -> torch.Tensor:
        """``lead * apply(x)`` (bit for bit: sign flips are exact), one multiply-add fewer than
        applying every sign: x_0 + sum_q x_q * (sign_q * lead) over the k-wide slices x_q. A
        bucket's sign cancels in the inner products of factors, and the streaming path folds it
        into the final hash's signs (FactorProjection.accumulate_led). Hashed factors: ``apply(x)``."""
        if self.rule == "hashed":
            return self.apply(x)
        if x.dtype not in self._relative_slices:  # sign_q * lead of each slice after the first
            lead = self.lead
            self._relative_slices[x.dtype] = tuple(
                (s * lead[:s.shape[0]]).to(x.dtype) for s in self.sign[self.k:].split(self.k))
        relative = self._relative_slices[x.dtype]
        slices = x.split(self.k, dim=-1)
        if slices[1].shape[-1] == self.k:
            out = torch.addcmul(slices[0], slices[1], relative[0])
        else:
            out = slices[0].clone()
            out[..., :slices[1].shape[-1]].addcmul_(slices[1], relative[0])
        for piece, sign in zip(slices[2:], relative[1:]):  # one fused multiply-add per k-wide slice
            (out if piece.shape[-1] == self.k else out[..., :piece.shape[-1]]).addcmul_(piece, sign)
        return out

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """P x along the last dim: (..., size) -> (..., k); folded factors: lead * apply_led(x)."""
        if self.rule == "hashed":
            acc = x.new_zeros(*x.shape[:-1], 2 * self.k)
            acc.index_add_(x.dim() - 1, self.codes, x)
            return acc[..., :self.k] - acc[..., self.k:]
        return self.apply_led(x).mul_(self.lead.to(x.dtype))

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bucket, negative) of coordinates ``ids``: P[:, id] = +-e_bucket (an embedding's one-hot rows)."""
        return self.bucket[ids], self.sign[ids] < 0

    def dense(self) -> torch.Tensor:
        """The factor as a (k, size) matrix (one +-1 per column). For checks; never used to project."""
        mat = torch.zeros(self.k, self.size)
        mat[self.bucket.cpu(), torch.arange(self.size)] = self.sign.cpu()
        return mat


class FoldedHash:
    """The final hash of version 3: entry f of a parameter's flattened block (or vector) goes to
    coordinate ``(offset + f) mod dim`` with a random sign, offset and signs seeded per parameter
    name and size: a multiply-add per dim-wide slice instead of a scattered add per entry."""

    def __init__(self, dim: int, seed: int, device: torch.device) -> None:
        self.dim, self.seed, self.device = dim, seed, device
        self._keys: dict[tuple[str, int], tuple[int, list[int], tuple[torch.Tensor, ...]]] = {}

    def _key(self, name: str, size: int) -> tuple[int, list[int], tuple[torch.Tensor, ...]]:
        """(offset, lengths, signs) of parameter ``name``'s ``size`` entries: entry f goes to
        (offset + f) mod dim, so the entries run in segments that alternate between the
        destinations [offset, dim) and [0, offset); ``lengths`` and ``signs`` are per segment."""
        if (name, size) not in self._keys:
            gen = torch.Generator().manual_seed(stable_seed(self.seed, name, size))
            offset = int(torch.randint(0, self.dim, (1,), generator=gen))
            sign = torch.where(torch.randint(0, 2, (size,), generator=gen).bool(), -1.0, 1.0)
            lengths, lo, room = [], 0, self.dim - offset
            while lo < size:
                lengths.append(min(room, size - lo))
                lo += lengths[-1]
                room = offset if room == self.dim - offset and offset else self.dim - offset
            self._keys[(name, size)] = offset, lengths, sign.to(self.device).split(lengths)
        return self._keys[(name, size)]

    def segments(self, name: str, size: int) -> tuple[list[int], torch.Tensor]:
        """(segment lengths, the whole sign vector) of parameter ``name``'s ``size`` entries."""
        _, lengths, signs = self._key(name, size)
        return lengths, torch.cat(signs)

    @property
    def accumulator_width(self) -> int:
        """Columns of the accumulator of :meth:`accumulate`: the sketch itself."""
        return self.dim

    def finish(self, acc: torch.Tensor) -> torch.Tensor:
        """The sketches of an accumulator filled by :meth:`accumulate` (itself)."""
        return acc

    def accumulate(self, out: torch.Tensor, name: str, value: torch.Tensor,
                   signs: tuple[torch.Tensor, ...] | None = None) -> None:
        """out (R, dim) += the hash of ``value`` (R, ...), the blocks or vectors of parameter ``name``
        (with per-segment ``signs`` in place of the seeded ones when given: :meth:`segments`)."""
        flat = value.reshape(value.shape[0], -1)
        if flat.dtype != out.dtype:
            flat = flat.to(out.dtype)
        offset, lengths, seeded = self._key(name, flat.shape[1])
        signs = seeded if signs is None else signs
        destinations = (out[:, offset:], out[:, :offset])
        for i, (piece, sign) in enumerate(zip(flat.split(lengths, dim=1), signs)):
            dest = destinations[i % 2] if offset else out
            (dest if dest.shape[1] == piece.shape[1] else dest[:, :piece.shape[1]]).addcmul_(piece, sign)

    def project(self, items: dict[str, torch.Tensor]) -> torch.Tensor:
        """(R, dim) hashes of the items (name -> (R, ...)), summed in sorted-name order."""
        out = None
        for name in sorted(items):
            value = items[name]
            if out is None:
                out = torch.zeros(value.shape[0], self.dim, device=value.device)
            self.accumulate(out, name, value)
        return out


def apply_sketch(x: torch.Tensor, sketch: CountSketch | None) -> torch.Tensor:
    """``sketch.apply(x)``, or x itself for an unprojected side (None)."""
    return x if sketch is None else sketch.apply(x)


def apply_led(x: torch.Tensor, sketch: CountSketch | None) -> torch.Tensor:
    """``sketch.apply_led(x)`` (lead * P x, for FactorProjection.accumulate_led), or x for an unprojected side."""
    return x if sketch is None else sketch.apply_led(x)


class FactorProjection:
    """Factors of the weight matrices ``matrices`` (names of ``shapes``) and the final projection."""

    def __init__(self, spec: ProjectionSpec, shapes: dict[str, tuple[int, ...]], matrices: Sequence[str],
                 device: torch.device) -> None:
        self.spec = spec
        self.rule = FACTOR_RULES[spec.factor_version]
        self.shapes = shapes
        self.matrices = list(matrices)
        self.device = device
        final_seed = stable_seed(spec.seed, "factored", "final")
        self.final = (FoldedHash(spec.dim, final_seed, device) if self.rule.buckets == "folded" else
                      SparseProjector(ProjectionSpec(dim=spec.dim, seed=final_seed, mode="sparse")))
        self._sketches: dict[tuple, CountSketch | None] = {}
        self._led_signs: dict[str, tuple[torch.Tensor, ...]] = {}  # accumulate_led's hash signs per matrix

    def seed_name(self, name: str, side: str) -> str:
        """The name a factor is seeded from: the parameter's, or (column side, shared_columns) its
        parent module's, e.g. ``model.layers.0.mlp`` for ``model.layers.0.mlp.up_proj.weight``."""
        if side == "col" and self.rule.shared_columns:
            return name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""
        return name

    def sketch(self, name: str, side: str) -> CountSketch | None:
        """P_row (side "row") or P_col ("col") of matrix ``name``, or None when that side is not
        projected; one object per seed (matrices sharing a factor get the same object)."""
        m, n = self.shapes[name]
        k_r, k_c = self.block_shape(name)
        size, k = (m, k_r) if side == "row" else (n, k_c)
        key = (self.seed_name(name, side), side, size, k)
        if key not in self._sketches:
            if k >= size:
                self._sketches[key] = None
            else:
                gen = torch.Generator().manual_seed(stable_seed(self.spec.seed, "factored", *key))
                self._sketches[key] = CountSketch(size, k, self.rule.buckets, gen, self.device)
        return self._sketches[key]

    def accumulator(self, rows: int) -> torch.Tensor:
        """A zero accumulator of ``rows`` sketches for :meth:`accumulate` (the final hash's form:
        the sketches themselves for version 3, signed bucket sums for 1 and 2)."""
        return torch.zeros(rows, self.final.accumulator_width, device=self.device)

    def accumulate(self, acc: torch.Tensor, name: str, value: torch.Tensor) -> None:
        """acc += the final hash of parameter ``name``'s blocks or vectors ``value`` (R, ...)."""
        self.final.accumulate(acc, name, value)

    def accumulate_led(self, acc: torch.Tensor, name: str, block: torch.Tensor) -> None:
        """acc += the final hash of matrix ``name``'s blocks made of :func:`apply_led` factors,
        (R, k_r, k_c) = lead_row B lead_col: its bucket signs are folded into the hash's (exact:
        the same sketch as :meth:`accumulate` of B)."""
        if self.rule.buckets == "hashed":  # hashed factors leave no sign out
            self.final.accumulate(acc, name, block)
            return
        if name not in self._led_signs:
            leads = [sketch.lead if sketch is not None else torch.ones(k, device=self.device)
                     for sketch, k in zip((self.sketch(name, "row"), self.sketch(name, "col")), self.block_shape(name))]
            lengths, signs = self.final.segments(name, leads[0].numel() * leads[1].numel())
            self._led_signs[name] = (signs * torch.outer(*leads).flatten()).split(lengths)
        self.final.accumulate(acc, name, block, self._led_signs[name])

    def finish(self, acc: torch.Tensor) -> torch.Tensor:
        """The (R, dim) sketches of an accumulator."""
        return self.final.finish(acc)

    def factor(self, name: str, side: str) -> torch.Tensor | None:
        """The factor as a dense (k, size) matrix, or None for identity. For checks."""
        sketch = self.sketch(name, side)
        return None if sketch is None else sketch.dense()

    def block_shape(self, name: str) -> tuple[int, int]:
        return factor_dims(self.shapes[name], self.spec.factor_side)

    def reference_blocks(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Intermediate blocks P_row G P_col^T (matrices) / exact vectors of explicit gradients
        (name -> (B, *shape)): what the factored path computes without materialising G."""
        out = {}
        for name, grad in grads.items():
            grad = grad.float()
            if name in self.matrices:
                grad = apply_sketch(grad, self.sketch(name, "col"))
                grad = apply_sketch(grad.transpose(1, 2), self.sketch(name, "row")).transpose(1, 2).contiguous()
            out[name] = grad
        return out

    def reference(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, dim) sketches of explicit per-example gradients under the same seeded factors."""
        return self.final.project(self.reference_blocks(grads))
