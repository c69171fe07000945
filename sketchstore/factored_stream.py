"""Factored sketches accumulated during the backward pass (``norms="sketch"``, factored.py).

Without exact norms no row needs its unprojected factors after the pass, so every hooked
call's factors are projected where they appear and multiplied at once, as Bergson's
per-module collector does: the forward hook keeps P_col x_t of a linear layer for all S x T
positions of the pass (the input ids of an embedding, the normalised input of a norm), the
output-gradient hook computes P_row g_t and adds the per-sequence products
(P_row g_t)(P_col x_t)^T, one batched matrix product of (S, k_r, T) by (S, T, k_c), into its
row's block. Padding positions need no masking: right padding and causal attention leave
their output gradients exactly zero. Nothing is copied into row order, no per-row loop runs,
and nothing but the (rows, k_r, k_c) blocks outlives a pass; the blocks equal those of the
exact-norm path (same seeded factors), up to float rounding. The output embedding (``lm_head``)
reads the final hidden states at each sequence's loss positions only (a forward pre-hook
gathers them: (S, T, d) -> (S, L, d), L the most loss tokens of a sequence in the pass), so the
vocabulary-wide logits, their gradient and the output layer's factors cost L, not T, positions
per sequence; a model whose output embedding sees anything else keeps its whole logits.

Modules fed the same input tensor in a pass (q/k/v, gate/up) whose column factors are equal
(one factor per parent module and input width, factor_projection.py) project it once: the
projection is cached per pass by (input tensor, factor). The blocks accumulate in ``pool``
when given (the sketcher's buffers, reused across batches): fresh (rows, k_r, k_c) buffers per
batch cost more in page faults than their products (measured: 176k minor faults per 256 rows).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .factor_projection import apply_sketch
from .normalised import normalised_input
from .sequences import SequenceBatch


def stream_batch(sketcher, batch: SequenceBatch, passes: Sequence[torch.Tensor],
                 emit: Callable[[str, torch.Tensor], object], pool: dict[str, torch.Tensor] | None = None) -> list[float]:
    """Run ``batch`` in ``passes`` (sequence indices) with every parameter frozen (the caller's
    job); ``emit(name, (R, k_r, k_c) block or (R, m) vector)`` per selected parameter in sorted
    name order; returns per-row losses. ``pool``: name -> reusable accumulator (rows >= R; the
    emitted blocks are views into it, valid until the next call). ``sketcher``: the FactoredSketcher whose hooked modules
    (``uses``), factors (``projection``) and norm check (:func:`sketchstore.normalised.normalised_input`) are used."""
    R = batch.n_rows
    device = sketcher._device()
    projection = sketcher.projection
    acc: dict[str, torch.Tensor] = {}
    state: dict = {}
    seq_rows = batch.seq_rows.to(device)
    row_loss = torch.zeros(R, dtype=torch.float64)

    def accumulator(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if name not in acc:
            if pool is None:
                acc[name] = like.new_zeros((R,) + shape)
            else:
                if name not in pool or pool[name].shape[0] < R or tuple(pool[name].shape[1:]) != shape:
                    pool[name] = like.new_empty((R,) + shape)
                acc[name] = pool[name][:R].zero_()
        return acc[name]

    def add(name: str, rows: torch.Tensor, value: torch.Tensor) -> None:
        accumulator(name, tuple(value.shape[1:]), value).index_add_(0, rows, value)

    def sketches(name: str):
        return projection.sketch(name, "row"), projection.sketch(name, "col")

    def on_grad(use, saved, rows):
        def hook(grad):
            g = grad.detach().float()
            if use.bias:
                add(use.bias, rows, g.sum(1))
            if use.weight is None:
                return
            if use.kind == "linear":
                gp = apply_sketch(g, sketches(use.weight)[0])  # (S, T, k_r)
                add(use.weight, rows, torch.bmm(gp.transpose(1, 2), saved))
            elif use.kind == "embedding":
                add_lookup(use.weight, saved, g, rows)
            else:
                add(use.weight, rows, (g * saved).sum(1))
        return hook

    def add_lookup(name, ids, g, rows):
        """Block rows P_row[:, id] += (P_col g)^T: a signed row lookup per token."""
        row_sketch, col_sketch = sketches(name)
        k_r, k_c = projection.block_shape(name)
        gp = apply_sketch(g, col_sketch)  # (S, T, k_c)
        gp = torch.where((ids >= 0)[..., None], gp, torch.zeros_like(gp))  # padding_idx: no gradient
        ids = ids.clamp_min(0)
        if row_sketch is None:
            bucket = ids
        else:
            bucket, negative = row_sketch.lookup(ids)
            gp = torch.where(negative[..., None], -gp, gp)
        flat = (rows[:, None] * k_r + bucket).reshape(-1)
        accumulator(name, (k_r, k_c), gp).view(R * k_r, k_c).index_add_(0, flat, gp.reshape(-1, k_c))

    def project_input(x: torch.Tensor, name: str) -> torch.Tensor:
        """P_col x, once per (input tensor, factor) and pass (the cache holds x, so its id stays unique)."""
        col_sketch = sketches(name)[1]
        key = (id(x), id(col_sketch))
        if key not in state["inputs"]:
            state["inputs"][key] = (x, apply_sketch(x.detach().float(), col_sketch))
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
            output.register_hook(on_grad(use, saved, state["rows"]))
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
            state.update(rows=seq_rows[index.to(device)], inputs={}, keep=keep.to(device), padded=tuple(ids.shape),
                         gathered=False)
            logits = sketcher.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            column = slot if state["gathered"] else pos  # logits at loss positions only, or whole
            losses = batch.loss_fn(logits[local.to(device), column.to(device)], index)
            del logits
            state["inputs"] = {}
            if losses.requires_grad:
                losses.sum().backward()
            row_loss.index_add_(0, batch.seq_rows[index].cpu(), losses.detach().double().cpu())
    finally:
        for h in handles:
            h.remove()
    for name in sorted(n for n, _ in sketcher.params):
        value = acc.pop(name, None)
        emit(name, value if value is not None else sketcher._zeros(name, R))
    return row_loss.tolist()
