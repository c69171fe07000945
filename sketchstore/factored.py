"""Factored sketches: per-layer Kronecker projections from activations and output gradients.

Never materialises a per-example gradient vector. For a linear layer y = W x (W: m x n) the
gradient of one row (example) is G = sum_t g_t x_t^T over the row's tokens, g_t = dL/dy_t,
x_t the layer input. With seeded factors P_row (k_r x m) and P_col (k_c x n),

    P_row G P_col^T = sum_t (P_row g_t)(P_col x_t)^T,

so the inputs x_t (forward hooks) and output gradients g_t (tensor hooks) of one batched
forward and backward give the projected gradient of *every* row of the batch (LoGra/LogIX,
GraSS FactGraSS, Bergson's per-module mode). Rows are told apart by their tokens: sequences
never interact (causal attention, right padding), so each row's tokens carry exactly that
row's g_t and x_t; padding positions are dropped. ``SFTObjective.batch`` and
``POPIObjective.batch`` turn rows into sequences whose losses sum to each row's loss; the
sequences of a batch run in a few passes of similar lengths (:func:`plan_passes`: at most
15% padding, at most 2**14 positions and ``batch_size`` rows' sequences per pass; with
``norms="sketch"`` a batch is up to SORT_ROWS rows, so a pass takes its sequences from all of
them, longest first, as Bergson's batch allocation sorts documents by length). Every parameter is frozen during the pass and
the output of every hooked module not yet in the graph becomes a leaf (the input embedding's,
or with the embedding left out the first sketched layers'), so autograd computes activation
gradients only, never a weight gradient dW, and none below the lowest sketched modules.

The sketch of a row, with ``spec.mode == "factored"`` (keep_ratio must be 1):

1. Per selected weight matrix (name, shape m x n) an intermediate block B = P_row G P_col^T
   of k_r x k_c, ``k_r = min(m, side)``, ``k_c = min(n, side)``, with
   ``side = spec.factor_side``, by default ``2 ** ceil(log2(sqrt(2 * spec.dim)))``: 128 for
   k = 4096 or 8192, 256 for 16384-32768 (stores written before the field had
   ``2 ** ceil(log2(sqrt(8 * spec.dim)))``, 256 at 8192; spec.py keeps their meaning). Every
   layer gets a block of at least 2k entries whatever the number of layers; a side that fits
   (m <= side) is not projected (identity, exact on that side). Larger sides are more faithful
   and cost more: benchmarks/vs_bergson.py measures the curve. P_row and P_col are CountSketch matrices (one
   +-1 per column: bucket and sign per coordinate, O(m + n) per token), seeded from
   ``stable_seed(spec.seed, "factored", name, "row"|"col", size, k)``: nothing to save,
   identical in every process. ``spec.factor_version`` (factor_projection.py) says how: 3, the
   default, folds (bucket i mod k, seeded signs: a multiply-add per k-wide slice); 1 (what stores
   from before the field used) hashes to random buckets with one ``index_add_``; 2 is 1 with the
   column factor seeded from the parent module's name, so modules reading one input (q/k/v,
   gate/up) share P_col and the streaming path projects that input once per pass (correlated
   errors). Fidelity and speed of the three: benchmarks/README.md.
2. Small vector parameters (biases, RMSNorm/LayerNorm weights) keep their *exact* per-row
   gradient: bias -> sum_t g_t, norm weight w (out = w * z) -> sum_t g_t * z_t, with z the
   normalised input recomputed from the hooked input (checked once per module against the
   module's own output; a norm it cannot reproduce is refused: leave it out with ``params``).
3. Blocks and vectors are hashed into exactly ``spec.dim`` coordinates under the derived seed
   ``stable_seed(spec.seed, "factored", "final")``, one parameter at a time (blocks never pile
   up in memory), summed in sorted-name order: version 3 folds each parameter's flattened
   block at a seeded offset with seeded signs (``FoldedHash``: entry f to (offset + f) mod dim),
   versions 1 and 2 use the CountSketch of projection.py (``SparseProjector``).

Inner products stay unbiased (E<sketch(a), sketch(b)> = <a, b>), the convention of
projection.py, so sketch norms and cosines compare with those of the full gradients.

Why not an equal share of k per layer, concatenated? For a low-rank G (a row has few
tokens) a Kronecker projection is much noisier than a dense one of the same size: for a
rank-1 G the relative error of an inner product is ~ sqrt(1/k_r + 1/k_c), whatever the
layer's size. With ~30 matrices and k = 8192 an equal share is a 16 x 16 block per layer.
Measured on POPI gradients of the small Qwen2 (3.5M parameters, exact gradients, mean
|cosine error| over 780 pairs; benchmarks/README.md): 16 x 16 blocks 0.049, 128 x 128 blocks
hashed to k 0.017, 256 x 256 blocks hashed to k 0.009, plain CountSketch of the full gradient
0.009, CountSketch after keeping 10% of coordinates (CROPI's recipe) 0.011. Large blocks cost
little: T k_r k_c per row and layer (< 1% of a 1536-wide layer's forward at side 256) plus
hashing the blocks (~k_r k_c per layer and row). Gaussian factors measured no better than
CountSketch ones and cost O(k) per coordinate instead of O(1). (Several independent smaller
Kronecker blocks per layer would be more faithful at equal size, 2 s / D relative variance
for D entries in s x s blocks, but each copy costs another O(m + n) per token.)

Embeddings and tied weights. An ``nn.Embedding`` weight (V x d) has per-row gradient
sum_t e_{id_t} g_t^T (one-hot inputs), so its block is sum_t P_row[:, id_t] (P_col g_t)^T:
a signed row lookup, no V-sized product (tokens equal to ``padding_idx`` get no gradient, as
in torch). When ``lm_head`` shares the embedding's parameter (tied), both uses contribute to
the one parameter name, projected with the same P_row (vocab side) and P_col (hidden side)
and added in that projected space: the block is exactly P_row (G_head + G_embed) P_col^T.

With ``norms="sketch"`` each call's block is computed and hashed during the backward pass
instead (factored_stream.py): its factors are projected in its hooks, multiplied per pass, and
the final hash (linear) adds the block to the pass's sketches; no block outlives its hook.

Gradient norms (``norms``). ``"exact"`` (default): exact per-row ||g|| (the catalog uses
grad_norm == 0 for zero-gradient rows; a POPI prompt whose advantages are all zero has no
sequence and gets a zero sketch and norm 0). Per matrix and row, whichever costs less for the
row's token count T: the Gram form ||sum_t a_t b_t^T||_F^2 = sum_{t,s} (a_t.a_s)(b_t.b_s)
(T^2 (m + n), incl. the cross terms of tied contributions) with the block from the projected
factors, or the row's m x n gradient (T m n, one matrix of one row at a time), its norm, and the
block by hashing it. For long rows this costs about as much as the weight gradient a per-row
backward computes: exact norms were the largest extra cost of this path on small models (see
benchmarks/README.md). ``"sketch"``: grad_norm is the norm of the row's float32 sketch (the
store's sketch_norm, bit for bit) and no exact norm is computed; every block then comes from the
projected factors. Its square is unbiased: with independent uniform signs E[P^T P] = I for each
CountSketch P (the factors and the final hash, independently seeded), so
E||P_row G P_col^T||_F^2 = ||G||_F^2, E||S B||^2 = ||B||^2 for the final hash S, and the cross
terms between parameters (independent signs) vanish in expectation: E[sketch_norm^2] = ||g||^2
over the seed (tests/test_factored.py checks it; on the tiny test model, 48 seeds, the mean
ratio sketch_norm^2 / ||g||^2 was 1.007 +- 0.011 at k = 256 and 0.998 +- 0.002 at k = 8192).
The norm itself is low by Jensen's gap (relative ~v/8, v the relative variance of the square);
its relative error is at most ~sqrt(1/(2k)) from the final hash plus the Kronecker stage's share
on projected sides (exact sides and vectors add none): 0.9% mean at k = 8192 there. Zero-gradient
rows still get exactly 0. The store records which one it holds (manifest column
``grad_norm_kind``, set by build.py).

Tokens whose output gradient is exactly zero contribute nothing to a matrix's block (nor
norm) and are dropped before the per-row products when they are a sizeable share (in the last
layer, q/o/MLP/lm_head get gradient only at loss positions).

Supported parameters: weights of ``nn.Linear`` and ``nn.Embedding`` (2-D, possibly tied),
``nn.Linear`` biases, weights of RMSNorm-like modules (class name ending in ``RMSNorm``,
out = w * x / rms(x)) and ``nn.LayerNorm`` weights/biases. Any other selected parameter is
refused with a message naming it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .errors import BadInputError
from .factor_projection import FactorProjection
from .factored_blocks import block_and_norm
from .factored_stream import stream_batch
from .normalised import normalised_input
from .sequences import SequenceBatch
from .sketchers import SketchedRows
from .spec import ProjectionSpec

__all__ = ["BLOCK_DTYPES", "FactoredSketcher", "NORM_MODES", "batch_passes", "plan_passes"]

#: Most padded token positions per forward/backward pass (bounds activation memory).
PASS_TOKENS = 1 << 14
#: Largest fraction of a pass's positions that may be padding before a new pass starts.
PASS_WASTE = 0.15
#: Rows tokenised into one batch by ``sketch_rows`` with norms "sketch": its passes group
#: sequences of similar lengths across all of them (13% padding in batches of 32 SFT rows of
#: the benchmarks' word problems, 5% sorted over 256; benchmarks/README.md).
SORT_ROWS = 1024
#: ``norms`` of FactoredSketcher: exact per-row gradient norms, or the norm of each row's sketch.
NORM_MODES = ("exact", "sketch")
#: ``block_dtype`` of FactoredSketcher: the dtype of the streaming path's block products (the
#: projected factors and P_row G P_col^T; the final hash accumulates in float32). ``auto``:
#: bfloat16 where the device multiplies it fast (see :func:`fast_bfloat16`) and norms are
#: ``sketch``, else float32. On the 4-layer benchmark model bfloat16 blocks are 2.5x faster
#: products and leave the sketches within 0.3% (relative norm) of float32 ones, Spearman vs
#: exact unchanged to 4 digits (benchmarks/README.md).
BLOCK_DTYPES = ("auto", "float32", "bfloat16")
#: torch's probes of a CPU's bfloat16 matrix units (avx512_bf16 dot products, AMX tiles), used by oneDNN.
CPU_BF16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def fast_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices faster than float32: a CUDA device with
    bfloat16 support, or a CPU with avx512_bf16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in CPU_BF16_PROBES)
    return False


def check_block_dtype(block_dtype: str, norms: str) -> None:
    """Refuse a ``block_dtype`` that is not one of BLOCK_DTYPES, or bfloat16 without sketch norms."""
    if block_dtype not in BLOCK_DTYPES:
        raise BadInputError(f"unknown block dtype {block_dtype!r}; choose one of {', '.join(BLOCK_DTYPES)}")
    if block_dtype == "bfloat16" and norms != "sketch":
        raise BadInputError("block dtype bfloat16 needs --projection factored with --norms sketch "
                            "(exact norms build their blocks in float32)")


def resolve_block_dtype(block_dtype: str, norms: str, device: torch.device) -> torch.dtype:
    """The torch dtype of ``block_dtype`` for a sketcher with ``norms`` on ``device`` (checked first)."""
    check_block_dtype(block_dtype, norms)
    if block_dtype == "auto":
        block_dtype = "bfloat16" if norms == "sketch" and fast_bfloat16(device) else "float32"
    return getattr(torch, block_dtype)


def plan_passes(lengths: Sequence[int], max_tokens: int | None = None, waste: float | None = None,
                max_sequences: int | None = None) -> list[torch.Tensor]:
    """Sequence indices grouped into passes: longest first, a new pass whenever padding would
    exceed ``waste`` of a pass's positions (default PASS_WASTE), the pass would exceed
    ``max_tokens`` positions (default PASS_TOKENS) or hold more than ``max_sequences`` sequences
    (default: no limit); indices ascending within a pass."""
    max_tokens = PASS_TOKENS if max_tokens is None else max_tokens
    waste = PASS_WASTE if waste is None else waste
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    passes, current, real = [], [], 0
    for i in order:
        if current:
            width = lengths[current[0]]
            size = (len(current) + 1) * width
            if (size > max_tokens or real + lengths[i] < (1 - waste) * size
                    or (max_sequences is not None and len(current) >= max_sequences)):
                passes.append(current)
                current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        passes.append(current)
    return [torch.tensor(sorted(p), dtype=torch.long) for p in passes]


def batch_passes(batch: SequenceBatch, rows_per_pass: int | None) -> list[torch.Tensor]:
    """The passes of a SequenceBatch (:func:`plan_passes`), at most ``rows_per_pass`` rows' worth
    of sequences each (a row's share: the batch's sequences per row, rounded up; no cap when None)."""
    per_row = -(-batch.n_sequences // max(1, batch.n_rows))
    cap = None if rows_per_pass is None else max(1, rows_per_pass * per_row)
    return plan_passes([len(q) for q in batch.sequences], max_sequences=cap)


@dataclass
class _Record:
    """One call of a hooked module: its compact (valid-token) factors; ``g`` filled by backward."""

    x: torch.Tensor | None = None  # linear input (N, n), norm's normalised input z (N, d), or ids (N,)
    g: torch.Tensor | None = None  # output gradient (N, m)


@dataclass
class _Use:
    """A module using selected parameters: kind in linear / embedding / norm."""

    kind: str
    module: nn.Module
    weight: str | None
    bias: str | None = None
    records: list = field(default_factory=list)
    checked: bool = False
    calls: int = 0


def _is_rmsnorm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and (hasattr(module, "variance_epsilon") or hasattr(module, "eps")))


@contextmanager
def _frozen(model: nn.Module):
    """Every parameter frozen (no dW is computed); flags restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class FactoredSketcher:
    """Factored sketches of many rows per forward/backward (see the module docstring).

    model: the causal LM; params: the selected (name, parameter) pairs (``select_parameters``);
    spec: a ProjectionSpec with mode ``factored`` and keep_ratio 1; norms: ``exact`` per-row
    gradient norms or the ``sketch`` norm (see the module docstring; the sketches are the same
    up to float rounding); block_dtype: one of BLOCK_DTYPES, resolved to ``self.block_dtype``.
    """

    def __init__(self, model: nn.Module, params: Sequence[tuple[str, nn.Parameter]], spec: ProjectionSpec,
                 norms: str = "exact", block_dtype: str = "auto") -> None:
        if not isinstance(spec, ProjectionSpec) or spec.mode != "factored":
            raise BadInputError(f"FactoredSketcher needs a ProjectionSpec with mode 'factored', got {spec!r}")
        if float(spec.keep_ratio) != 1.0:
            raise BadInputError("factored sketches do not drop coordinates: use keep ratio 1 with --projection factored")
        if norms not in NORM_MODES:
            raise BadInputError(f"gradient norms must be one of {', '.join(NORM_MODES)}, got {norms!r}")
        self.model = model
        self.spec = spec
        self.norms = norms
        self.block_dtype = resolve_block_dtype(block_dtype, norms, self._device())
        self.params = list(params)
        self.shapes = {name: tuple(p.shape) for name, p in self.params}
        by_id = {id(p): name for name, p in self.params}
        self.uses: list[_Use] = []
        covered: set[str] = set()
        for mod_name, module in model.named_modules():
            weight = by_id.get(id(getattr(module, "weight", None))) if getattr(module, "weight", None) is not None else None
            bias_t = getattr(module, "bias", None)
            bias = by_id.get(id(bias_t)) if isinstance(bias_t, torch.Tensor) else None
            if weight is None and bias is None:
                continue
            if isinstance(module, nn.Linear):
                self.uses.append(_Use("linear", module, weight, bias))
            elif isinstance(module, nn.Embedding):
                if module.max_norm is not None or module.scale_grad_by_freq:
                    raise BadInputError(f"factored mode: embedding {mod_name!r} uses max_norm/scale_grad_by_freq")
                self.uses.append(_Use("embedding", module, weight))
            elif _is_rmsnorm(module) or isinstance(module, nn.LayerNorm):
                self.uses.append(_Use("norm", module, weight, bias))
            else:
                continue
            covered.update(n for n in (weight, bias) if n is not None)
        missing = [n for n, _ in self.params if n not in covered]
        if missing:
            raise BadInputError(
                "factored mode cannot sketch parameter(s) " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                + " (only Linear/Embedding weights, Linear biases and RMSNorm/LayerNorm parameters); "
                "leave them out with --params")
        self.matrices = sorted({u.weight for u in self.uses if u.kind in ("linear", "embedding") and u.weight})
        for name in self.matrices:
            if len(self.shapes[name]) != 2:
                raise BadInputError(f"factored mode: parameter {name!r} is not a matrix (shape {self.shapes[name]})")
        self.projection = FactorProjection(spec, self.shapes, self.matrices, self._device())
        self._layout = None
        self._pool: dict[str, torch.Tensor] = {}  # the streaming path's scratch buffers (norms "sketch")

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ hooks
    def _store(self, buffer: torch.Tensor | None, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Write this pass's valid tokens of ``t`` (S, T, ...) into ``buffer`` (all tokens of the
        batch, row order, zeros where a pass did not write: those tokens contribute nothing;
        allocated on first use) at their row-ordered positions."""
        L = self._layout
        S, T = L["S"], L["T"]
        if t.shape[:2] != (S, T):
            raise BadInputError(f"factored mode: a hooked module saw shape {tuple(t.shape)}, expected ({S}, {T}, ...)")
        if buffer is None:
            buffer = torch.zeros((L["N"],) + tuple(t.shape[2:]), dtype=dtype, device=t.device)
        buffer.index_copy_(0, L["dest"], t.reshape(S * T, *t.shape[2:]).index_select(0, L["valid"]).to(dtype))
        return buffer

    def _grad_hook(self, record: _Record):
        def hook(grad):
            record.g = self._store(record.g, grad.detach(), torch.float32)
        return hook

    def _module_hook(self, use: _Use):
        def hook(module, inputs, output):
            call = use.calls
            use.calls += 1
            if call == len(use.records):
                use.records.append(_Record())
            record = use.records[call]
            x = inputs[0]
            if use.kind == "embedding":
                if module.padding_idx is not None:  # torch gives the padding row no gradient
                    x = torch.where(x == module.padding_idx, torch.full_like(x, -1), x)
                record.x = self._store(record.x, x, torch.long)
            elif use.weight is None:  # a selected bias needs the output gradient only
                pass
            elif use.kind == "linear":
                record.x = self._store(record.x, x.detach(), torch.float32)
            else:
                record.x = self._store(record.x, normalised_input(use, x.detach(), output.detach()), torch.float32)
            if not output.requires_grad:  # nothing below is sketched: the backward stops here
                output = output.detach().requires_grad_(True)
            output.register_hook(self._grad_hook(record))
            return output
        return hook

    # ------------------------------------------------------------------ sketching
    def sketch_rows(self, objective, rows: Sequence[dict], batch_size: int,
                    on_row: Callable[[int], object] | None = None) -> SketchedRows:
        """Sketch ``rows`` with at most ``batch_size`` rows' sequences per forward/backward pass.
        With norms ``sketch`` up to SORT_ROWS rows form one batch, so its passes group sequences of
        similar lengths (little padding); exact norms hold a batch's factors until its end, so
        their batches are ``batch_size`` rows. ``on_row(n)``: n more rows are done."""
        if not hasattr(objective, "batch"):
            raise BadInputError(f"objective {getattr(objective, 'name', objective)!r} has no batched form "
                                "(needed by --projection factored)")
        window = SORT_ROWS if self.norms == "sketch" else batch_size
        parts = []
        for lo in range(0, len(rows), window):
            parts.append(self.sketch_batch(objective.batch(rows[lo:lo + window]), batch_size, on_row))
        if not parts:
            return SketchedRows(torch.zeros(0, self.spec.dim), [], [], [])
        return SketchedRows(torch.cat([p.sketches for p in parts]), [x for p in parts for x in p.grad_norms],
                            [x for p in parts for x in p.n_tokens], [x for p in parts for x in p.losses])

    def sketch_batch(self, batch: SequenceBatch, rows_per_pass: int | None = None,
                     on_row: Callable[[int], object] | None = None) -> SketchedRows:
        """Sketches, gradient norms (exact or sketch, per ``norms``), token counts and losses of
        one SequenceBatch, with at most ``rows_per_pass`` rows' sequences per pass (all when None);
        ``on_row(n)`` as rows are done."""
        acc = self.projection.accumulator(batch.n_rows)
        passes = batch_passes(batch, rows_per_pass)
        if self.norms == "sketch":  # no exact norms: blocks hashed during backward (factored_stream.py)
            sq_norms, losses = None, self._stream(batch, passes, acc, on_row)
        else:
            sq_norms, losses = self._run(batch, passes, lambda name, value: self.projection.accumulate(acc, name, value))
            if on_row is not None:
                on_row(batch.n_rows)
        sketches = self.projection.finish(acc).cpu()
        norms = sketches.norm(dim=1) if sq_norms is None else sq_norms.clamp_min(0).sqrt()
        return SketchedRows(sketches, norms.tolist(), list(batch.n_tokens), losses)

    def blocks(self, batch: SequenceBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, list[float]]:
        """(name -> (R, k_r, k_c) block or (R, m) exact vector, (R,) float64 squared exact
        gradient norms (None with norms ``sketch``), per-row losses) of one batch of R rows (for
        checks: holds every block at once; the streaming path of norms ``sketch`` never does)."""
        out: dict[str, torch.Tensor] = {}
        sq_norms, losses = self._run(batch, batch_passes(batch, None), out.__setitem__)
        return out, sq_norms, losses

    def _stream(self, batch: SequenceBatch, passes: list[torch.Tensor], acc: torch.Tensor,
                on_row: Callable[[int], object] | None) -> list[float]:
        """Per-row losses; each row's hashed blocks added into the accumulator ``acc`` as the passes run."""
        if batch.n_sequences == 0:
            if on_row is not None:
                on_row(batch.n_rows)
            return [0.0] * batch.n_rows
        with _frozen(self.model), torch.enable_grad():
            return stream_batch(self, batch, passes, acc, self._pool, on_row)

    def _run(self, batch: SequenceBatch, passes: list[torch.Tensor], emit: Callable[[str, torch.Tensor], object]
             ) -> tuple[torch.Tensor | None, list[float]]:
        """Run the batch; ``emit(name, block or vector)`` for every selected parameter in sorted
        name order (blocks are (R, k_r, k_c), vectors (R, m)); returns ((R,) float64 squared
        exact gradient norms or None (norms ``sketch``), per-row losses).

        The batch's sequences run in a few passes (one forward + one backward each) of similar
        lengths, so little compute goes to padding (see :func:`plan_passes`); hooks write each
        pass's real tokens straight to their place in row order (sequences are grouped by row)."""
        R = batch.n_rows
        device = self._device()
        sq_norms = torch.zeros(R, dtype=torch.float64) if self.norms == "exact" else None
        if batch.n_sequences == 0:
            for name, _ in sorted(self.params, key=lambda item: item[0]):
                emit(name, self._zeros(name, R))
            return sq_norms, [0.0] * R
        seq_rows = batch.seq_rows.cpu()
        if bool((seq_rows[1:] < seq_rows[:-1]).any()):
            raise BadInputError("sequence batch: sequences must be grouped by row, in row order")
        lengths = torch.tensor([len(q) for q in batch.sequences], dtype=torch.long)
        offsets = (torch.cumsum(lengths, 0) - lengths).to(device)  # row order = sequence order
        tok_row = torch.repeat_interleave(seq_rows, lengths).to(device)
        counts = torch.bincount(seq_rows, weights=lengths.double(), minlength=R).long().tolist()
        ends = torch.cumsum(torch.tensor(counts), 0).tolist()
        bounds = [(e - c, e) for e, c in zip(ends, counts)]
        row_loss = torch.zeros(R, dtype=torch.float64)
        for use in self.uses:
            use.records = []
        handles = [u.module.register_forward_hook(self._module_hook(u)) for u in self.uses]
        try:
            with _frozen(self.model), torch.enable_grad():
                for index in passes:
                    ids, mask = batch.padded(index)
                    S, T = ids.shape
                    valid = mask.reshape(-1).nonzero().squeeze(1).to(device)
                    dest = offsets[index.to(device)][valid // T] + valid % T
                    self._layout = {"S": S, "T": T, "valid": valid, "dest": dest, "N": int(lengths.sum())}
                    for use in self.uses:
                        use.calls = 0
                    logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                    losses = batch.loss_fn(batch.token_logits(logits, index), index)
                    del logits
                    if losses.requires_grad:
                        losses.sum().backward()
                    row_loss.index_add_(0, seq_rows[index], losses.detach().double().cpu())
            self._layout = {"row": tok_row, "bounds": bounds, "R": R, "N": int(lengths.sum())}
            self._assemble(sq_norms, emit)
        finally:
            for h in handles:
                h.remove()
            for use in self.uses:
                use.records = []
            self._layout = None
        return sq_norms, row_loss.tolist()

    def _row_sum(self, t: torch.Tensor) -> torch.Tensor:
        L = self._layout
        return t.new_zeros((L["R"],) + tuple(t.shape[1:])).index_add_(0, L["row"], t)

    def _zeros(self, name: str, rows: int) -> torch.Tensor:
        shape = self.projection.block_shape(name) if name in self.matrices else self.shapes[name]
        return torch.zeros((rows,) + tuple(shape), device=self._device())

    def _assemble(self, sq_norms: torch.Tensor | None, emit: Callable[[str, torch.Tensor], object]) -> None:
        contribs: dict[str, list] = {}  # matrix -> [(row factor: (N, m) float or (N,) ids, col factor (N, n))]
        vectors: dict[str, torch.Tensor] = {}

        def add_vector(name, value):
            vectors[name] = vectors[name] + value if name in vectors else value

        for use in self.uses:
            for rec in use.records:
                g = rec.g
                if g is None:  # the output got no gradient in any pass (e.g. unused by the loss): adds nothing
                    continue
                if use.kind == "linear":
                    if use.weight:
                        contribs.setdefault(use.weight, []).append((g, rec.x))
                    if use.bias:
                        add_vector(use.bias, self._row_sum(g))
                elif use.kind == "embedding":
                    g = torch.where((rec.x >= 0)[:, None], g, torch.zeros_like(g))  # padding_idx: no gradient
                    contribs.setdefault(use.weight, []).append((rec.x.clamp_min(0), g))
                else:
                    if use.weight:
                        add_vector(use.weight, self._row_sum(g * rec.x))
                    if use.bias:
                        add_vector(use.bias, self._row_sum(g))
        R = self._layout["R"]
        for name in sorted(n for n, _ in self.params):
            sq = None
            if name in contribs:
                value, sq = block_and_norm(self.projection, name, contribs.pop(name), self._layout, self.norms == "exact")
            elif name in vectors:
                value = vectors.pop(name)
                if sq_norms is not None:
                    sq = value.double().pow(2).sum(1)
            else:  # selected but not reached by this forward: zero gradient
                value = self._zeros(name, R)
            if sq is not None:
                sq_norms += sq.cpu()
            emit(name, value)
