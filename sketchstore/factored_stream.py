"""Factored sketches hashed during the backward pass (``norms="sketch"``, factored.py).

Without exact norms no row needs its unprojected factors after the pass, so every hooked
call's factors are projected where they appear, multiplied, and hashed into the sketch at
once: the forward hook keeps P_col x_t of a linear layer for all S x T positions of the pass
(the input ids of an embedding, the normalised input of a norm), the output-gradient hook
computes P_row g_t, the per-sequence block sum_t (P_row g_t)(P_col x_t)^T (one batched matrix
product of (S, k_r, T) by (S, T, k_c), written into one reused scratch buffer) and adds its
final hash to the pass's (S, k) sketches (its accumulator: signed bucket sums of 2k columns for
factor versions 1 and 2); after the backward those are added to their rows'.
The final hash is linear, so hashing each call's block as it appears equals hashing the sum
of the blocks (tied weights, a row's several sequences), up to float rounding; only a
(S, k_r, k_c) scratch and the (S, k) pass sketches exist at any time: no per-row block
accumulators (at 29 matrices of 128 x 128 and 32 rows, 58 MB written, re-read and zeroed per
batch, which cost more than the block products themselves: benchmarks/README.md). Padding
positions need no masking: right padding and causal attention leave their output gradients
exactly zero. The output embedding (``lm_head``) reads the final hidden states at each
sequence's loss positions only (a forward pre-hook gathers them: (S, T, d) -> (S, L, d), L the
most loss tokens of a sequence in the pass), so the vocabulary-wide logits, their gradient and
the output layer's factors cost L, not T, positions per sequence; a model whose output
embedding sees anything else keeps its whole logits.

The projected factors and the block products are in the sketcher's ``block_dtype`` (float32, or
bfloat16 where the device multiplies it fast: factored.py BLOCK_DTYPES); the final hash adds the
blocks into float32 sketches. The embedding's lookup blocks stay float32 (``index_add_``).
A linear layer's folded factors leave out their first slice's signs (``CountSketch.apply_led``:
one multiply-add fewer per factor) and its blocks are hashed with those signs folded into the
final hash's (``FactorProjection.accumulate_led``): bit for bit the same sketches.

Modules fed the same input tensor in a pass (q/k/v, gate/up) whose column factors are equal
(one factor per parent module and input width, factor_version 2: factor_projection.py) project
it once: the projection is cached per pass by (input tensor, factor). The scratch buffers live
in ``pool`` when given (the sketcher's, reused across batches: fresh buffers per batch cost
page faults).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from .factor_projection import apply_led, apply_sketch
from .normalised import normalised_input
from .sequences import SequenceBatch


def stream_batch(sketcher, batch: SequenceBatch, passes: Sequence[torch.Tensor], acc: torch.Tensor,
                 pool: dict[str, torch.Tensor] | None = None,
                 on_row: Callable[[int], object] | None = None) -> list[float]:
    """Run ``batch`` in ``passes`` (sequence indices) with every parameter frozen (the caller's
    job), adding each row's hashed blocks into ``acc`` (R rows of the final hash's accumulator:
    ``FactorProjection.accumulator``); returns per-row losses. ``pool``:
    reusable scratch buffers (name -> flat tensor). ``on_row(n)``: after each pass, the n rows
    whose last sequence it ran (rows without sequences at the end). ``sketcher``: the FactoredSketcher whose hooked
    modules (``uses``), factors and final hash (``projection``) and norm check
    (:func:`sketchstore.normalised.normalised_input`) are used."""
    R = batch.n_rows
    device = sketcher._device()
    projection = sketcher.projection
    pool = {} if pool is None else pool
    state: dict = {}
    row_loss = torch.zeros(R, dtype=torch.float64)
    remaining = torch.bincount(batch.seq_rows.cpu(), minlength=R)  # sequences of each row still to run
    reported = 0

    block_dtype = sketcher.block_dtype

    def scratch(key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A reused buffer of ``shape`` and ``dtype`` (uninitialised), grown when too small."""
        size = math.prod(shape)
        if key not in pool or pool[key].numel() < size or pool[key].dtype != dtype:
            pool[key] = torch.empty(size, device=device, dtype=dtype)
        return pool[key][:size].view(shape)

    def hash_into(name: str, value: torch.Tensor) -> None:
        projection.accumulate(state["sketch"], name, value)

    factors: dict[str, tuple] = {}

    def sketches_of(name: str):
        """(P_row, P_col) of matrix ``name`` (looked up once per batch)."""
        if name not in factors:
            factors[name] = projection.sketch(name, "row"), projection.sketch(name, "col")
        return factors[name]

    def on_grad(use, saved):
        def hook(grad):
            g = grad if grad.dtype == torch.float32 else grad.float()  # a hook's grad has no graph: no detach
            if use.bias:
                hash_into(use.bias, g.sum(1))
            if use.weight is None:
                return
            if use.kind == "linear":
                gp = apply_led(g, sketches_of(use.weight)[0]).to(block_dtype)  # (S, T, k_r)
                block = scratch("block", (gp.shape[0], gp.shape[2], saved.shape[2]), block_dtype)
                projection.accumulate_led(state["sketch"], use.weight, torch.bmm(gp.transpose(1, 2), saved, out=block))
            elif use.kind == "embedding":
                hash_into(use.weight, lookup_block(use.weight, saved, g))
            else:
                hash_into(use.weight, (g * saved).sum(1))
        return hook

    def lookup_block(name, ids, g):
        """Per-sequence blocks with rows P_row[:, id] += (P_col g)^T: a signed row lookup per token."""
        row_sketch, col_sketch = sketches_of(name)
        k_r, k_c = projection.block_shape(name)
        S = ids.shape[0]
        gp = apply_sketch(g, col_sketch)  # (S, T, k_c)
        gp = torch.where((ids >= 0)[..., None], gp, torch.zeros_like(gp))  # padding_idx: no gradient
        ids = ids.clamp_min(0)
        if row_sketch is None:
            bucket = ids
        else:
            bucket, negative = row_sketch.lookup(ids)
            gp = torch.where(negative[..., None], -gp, gp)
        flat = (torch.arange(S, device=device)[:, None] * k_r + bucket).reshape(-1)
        block = scratch("lookup", (S * k_r, k_c)).zero_()
        return block.index_add_(0, flat, gp.reshape(-1, k_c)).view(S, k_r, k_c)

    def project_input(x: torch.Tensor, name: str) -> torch.Tensor:
        """lead * P_col x (factor_projection.apply_led), once per (input tensor, factor) and pass
        (the cache holds x, so its id stays unique)."""
        col_sketch = sketches_of(name)[1]
        key = (id(x), id(col_sketch))
        if key not in state["inputs"]:
            x_data = x.detach()
            x_data = x_data if x_data.dtype == torch.float32 else x_data.float()
            state["inputs"][key] = (x, apply_led(x_data, col_sketch).to(block_dtype))
        return state["inputs"][key][1]

    def on_forward(use):
        def hook(module, inputs, output):
            x = inputs[0]
            saved = None
            if use.kind == "embedding":
                saved = x if module.padding_idx is None else torch.where(x == module.padding_idx, -1, x)
            elif use.weight is not None and use.kind == "linear":
                saved = project_input(x, use.weight)
            elif use.weight is not None:
                saved = normalised_input(use, x.detach(), output.detach())
            if not output.requires_grad:  # nothing below is sketched: the backward stops here
                output = output.detach().requires_grad_(True)
            output.register_hook(on_grad(use, saved))
            return output
        return hook

    def gather_loss_positions(module, inputs):
        """The output embedding's input at the pass's loss positions only, (S, T, d) -> (S, L, d)."""
        keep, x = state["keep"], inputs[0]
        if x.dim() != 3 or tuple(x.shape[:2]) != state["padded"]:
            return None  # not the final hidden states of this pass: logits stay whole
        state["gathered"] = True
        return (x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1])),) + tuple(inputs[1:])

    head = sketcher.model.get_output_embeddings()
    handles = [head.register_forward_pre_hook(gather_loss_positions)] if isinstance(head, nn.Module) else []
    handles += [u.module.register_forward_hook(on_forward(u)) for u in sketcher.uses]
    try:
        for index in passes:
            ids, mask = batch.padded(index)
            local, pos, slot = batch.loss_tokens(index)
            keep = torch.zeros(len(index), int(slot.max()) + 1 if len(slot) else 1, dtype=torch.long)
            keep[local, slot] = pos
            state.update(inputs={}, keep=keep.to(device), padded=tuple(ids.shape), gathered=False,
                         sketch=scratch("pass", (len(index), acc.shape[1])).zero_())
            logits = sketcher.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            column = slot if state["gathered"] else pos  # logits at loss positions only, or whole
            losses = batch.loss_fn(logits[local.to(device), column.to(device)], index)
            del logits
            state["inputs"] = {}
            if losses.requires_grad:
                losses.sum().backward()
            rows = batch.seq_rows[index].cpu()
            acc.index_add_(0, rows.to(device), state["sketch"])
            row_loss.index_add_(0, rows, losses.detach().double().cpu())
            if on_row is not None:
                remaining.index_add_(0, rows, torch.full_like(rows, -1))
                done = int((remaining[rows.unique()] == 0).sum())  # each row's sequences run once
                reported += done
                on_row(done)
    finally:
        for h in handles:
            h.remove()
    if on_row is not None and reported < R:
        on_row(R - reported)
    return row_loss.tolist()
