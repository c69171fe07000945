"""The per-layer block math of factored sketches (factored.py): from a weight matrix's token
factors (row factor a_t, column factor b_t, per row of the batch) to its (R, k_r, k_c) blocks
P_row G_r P_col^T, with exact squared gradient norms where asked.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .factor_projection import CountSketch, FactorProjection, apply_sketch

#: Tokens with a zero output gradient are dropped from a matrix's products when fewer than this
#: share of its tokens remain (below it, the saved products outweigh the copy).
COMPACT_BELOW = 0.9


def block_and_norm(projection: FactorProjection, name: str, pieces: Sequence[tuple[torch.Tensor, torch.Tensor]],
                   layout: dict, exact: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(R, k_r, k_c) blocks P_row G_r P_col^T and (R,) float64 exact ||G_r||_F^2 (None unless
    ``exact``), where G_r = sum over row r's tokens of a_t b_t^T (a_t: (m,) or a one-hot
    id, b_t: (n,)); tokens with a zero output gradient are dropped first (:func:`compact`).

    With exact norms, per row whichever is cheaper for its T tokens (over all contributions):
    Gram form, T^2 (m + n) + T k_r k_c <= T m n + 2 m n: ||G||^2 = sum_{t,s} (a_t.a_s)(b_t.b_s)
    and the block from the projected factors, sum_t (P_row a_t)(P_col b_t)^T; otherwise G
    itself (m x n, one row and one matrix at a time), its norm, and the block by hashing G's
    rows and columns. With sketch norms every block comes from the projected factors.
    """
    R = layout["R"]
    m, n = projection.shapes[name]
    k_r, k_c = projection.block_shape(name)
    row_sketch, col_sketch = projection.sketch(name, "row"), projection.sketch(name, "col")
    device = projection.device
    pieces = [compact(a, b, layout) for a, b in pieces]
    tokens = [sum(bounds[r][1] - bounds[r][0] for _, _, bounds in pieces) for r in range(R)]
    gram = [not exact or t * t * (m + n) + t * k_r * k_c < t * m * n + 2 * m * n for t in tokens]
    block = torch.empty(R, k_r, k_c, device=device)  # every row is written below
    sq = torch.zeros(R, dtype=torch.float64, device=device) if exact else None
    projected = [project_factors(a, b, row_sketch, col_sketch) + (bounds,)
                 for a, b, bounds in pieces] if any(gram) else []
    for r in range(R):
        if tokens[r] == 0:
            block[r].zero_()
            continue
        parts = [(a[bounds[r][0]:bounds[r][1]], b[bounds[r][0]:bounds[r][1]]) for a, b, bounds in pieces] if exact else []
        if gram[r]:
            if exact:
                sq[r] = gram_norm(parts)
            written = False
            for a, b, bounds in projected:
                s, e = bounds[r]
                if e == s:
                    continue
                if a.dtype == torch.long:
                    if not written:
                        block[r].zero_()
                    block[r].index_add_(0, a[s:e], b[s:e])
                elif written:
                    block[r].addmm_(a[s:e].T, b[s:e])
                else:
                    torch.mm(a[s:e].T, b[s:e], out=block[r])
                written = True
        else:
            grad = torch.zeros(m, n, device=device)
            for a, b in parts:
                if a.dtype == torch.long:
                    grad.index_add_(0, a, b)
                else:
                    grad.addmm_(a.T, b)
            sq[r] = grad.pow(2).sum(dtype=torch.float64)
            grad = apply_sketch(grad, col_sketch)
            block[r] = apply_sketch(grad.T, row_sketch).T
    return block, sq


def compact(a: torch.Tensor, b: torch.Tensor, layout: dict) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """(a, b, per-row token bounds) of one contribution, without its tokens whose output
    gradient (a of a linear layer, b of an embedding lookup) is exactly zero when fewer than
    COMPACT_BELOW of them remain (tokens stay grouped by row, in order)."""
    L = layout
    grad = b if a.dtype == torch.long else a
    n_tokens = grad.shape[0]
    # a zero token has a zero first coordinate: one column tells when a full check can pay off
    if n_tokens == 0 or int(grad[:, 0].eq(0).sum()) <= (1 - COMPACT_BELOW) * n_tokens:
        return a, b, L["bounds"]
    index = grad.ne(0).any(1).nonzero().squeeze(1)
    if index.numel() >= COMPACT_BELOW * n_tokens:
        return a, b, L["bounds"]
    ends = torch.cumsum(torch.bincount(L["row"][index], minlength=L["R"]), 0).tolist()
    return a[index], b[index], list(zip([0] + ends[:-1], ends))


def project_factors(a: torch.Tensor, b: torch.Tensor, row_sketch: CountSketch | None,
                    col_sketch: CountSketch | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_row a_t, P_col b_t) per token; a one-hot a (ids) stays ids: P_row[:, id] = +-e_h(id)
    is a signed lookup (bucket ids, sign folded into the column factor)."""
    bp = apply_sketch(b, col_sketch)
    if a.dtype != torch.long:
        return apply_sketch(a, row_sketch), bp
    if row_sketch is None:
        return a, bp
    bucket, negative = row_sketch.lookup(a)
    return bucket, torch.where(negative[:, None], -bp, bp)


def gram_norm(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """||sum over parts and tokens of a_t b_t^T||_F^2 (float64) by the Gram form."""
    total = None
    for i, (ai, bi) in enumerate(parts):
        for j in range(i, len(parts)):
            aj, bj = parts[j]
            term = (gram_rows(ai, aj) * (bi @ bj.T)).sum(dtype=torch.float64)
            term = term if i == j else 2 * term
            total = term if total is None else total + term
    return total


def gram_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(Ta, Tb) inner products of row factors: dense vectors or one-hot ids."""
    if a.dtype != torch.long and b.dtype != torch.long:
        return a @ b.T
    if a.dtype == torch.long and b.dtype == torch.long:
        return (a[:, None] == b[None, :]).float()
    if a.dtype == torch.long:
        return gram_rows(b, a).T
    return a[:, b]
