"""The GRPO objective: group-normalised advantages and the clipped-ratio token loss.

For a prompt with K sampled responses y_1..y_K and rewards r_i (Shao et al. 2024, DeepSeekMath):

    A_i = (r_i - mean(r)) / (std(r) + eps)                 (same A_i for every token of y_i)
    ratio_{i,t} = exp(log pi_theta(y_{i,t} | ...) - log pi_old(y_{i,t} | ...))
    l_{i,t} = -min(ratio_{i,t} A_i, clip(ratio_{i,t}, 1 - eps_low, 1 + eps_high) A_i)
              + beta * KL_k3(pi_theta || pi_ref)_{i,t}
    KL_k3 = exp(log pi_ref - log pi_theta) - (log pi_ref - log pi_theta) - 1    (Schulman's k3)

Conventions
-----------
* Advantages: :func:`cropi.rollout.group_advantages` (re-exported here), i.e. the unbiased
  group std (ddof 1, as verl / TRL) plus :data:`cropi.rollout.ADVANTAGE_EPS`; a group whose
  rewards are all equal (a *zero-std* group) gets advantage 0 for every sample.
* Log-probs are taken at the sampling temperature (``sketchstore.sequences.token_logprobs``:
  ``log_softmax(logits / T)``) -- the same convention as ``cropi.popi`` and as the behaviour log-probs the vLLM engine returns
  (``processed_logprobs``), so ``ratio == 1`` when theta is the sampling policy.
* KL: coefficient 0 by default (as DAPO / Dr. GRPO: with verifiable rewards and short runs the
  reference anchor mostly slows learning); when > 0 the k3 estimator of KL(pi_theta || pi_ref)
  is added per token, evaluated at the same temperature.

Aggregation (``loss_agg``)
--------------------------
``"token-mean"`` (default): sum of l_{i,t} over every response token of the batch divided by
the number of those tokens (DAPO; verl's default). ``"seq-mean-token-mean"``: the mean over
each response's tokens, then the mean over responses (the original GRPO formula).

Why token-mean is the default: with seq-mean-token-mean a token's weight is 1/|y_i|, so a
long wrong answer is penalised less per token than a short one and short correct answers are
favoured more per token -- a length bias that lets wrong answers grow long (DAPO, Dr. GRPO
analyses). Token-mean weighs every token equally. On the short answers of the generated
arithmetic tasks the two differ little; both are available.

Normalisers: both aggregations accept an explicit denominator (``n_tokens`` / ``n_seqs``) so
a batch split into micro-batches for gradient accumulation sums to exactly the loss of the
whole batch (each micro-batch passes the *batch's* totals). The trainer counts the tokens and
sequences of zero-advantage groups in these denominators (their loss terms are exactly 0 when
the KL coefficient is 0, so it skips their forward pass): the loss is the GRPO loss of the
batch as sampled, and skipping them is a pure saving of compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import BadConfigError
from .rollout import ADVANTAGE_EPS, GROUP_STD_DDOF, group_advantages

__all__ = [
    "ADVANTAGE_EPS",
    "GROUP_STD_DDOF",
    "LOSS_AGGS",
    "DEFAULT_LOSS_AGG",
    "group_advantages",
    "batch_advantages",
    "kl_k3",
    "clipped_surrogate",
    "aggregate",
    "grpo_loss",
    "GRPOLossOutput",
]

LOSS_AGGS = ("token-mean", "seq-mean-token-mean")
DEFAULT_LOSS_AGG = "token-mean"


def batch_advantages(groups: Sequence[Sequence[float]]) -> tuple[list[list[float]], list[bool]]:
    """(advantages per group, zero_std flag per group) for the reward lists of many prompts."""
    advs, zero = [], []
    for rewards in groups:
        a, _, _, z = group_advantages(list(rewards))
        advs.append(a)
        zero.append(z)
    return advs, zero


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per sampled token: e^d - d - 1, d = ref - logp
    (non-negative, unbiased when the tokens are sampled from pi)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      clip_low: float = 0.2, clip_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss -min(ratio A, clip(ratio) A), ratio, clipped mask).

    ``advantages`` broadcasts against ``logp`` (e.g. [B, 1] against [B, T]). ``clipped`` marks
    tokens where the clipped branch is the minimum and differs from the unclipped one (their
    gradient is zero). ``clip_high`` defaults to ``clip_low`` (symmetric PPO clip).
    """
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = clipped_ratio * advantages
    surrogate = torch.minimum(unclipped, clipped)
    clip_mask = clipped < unclipped
    return -surrogate, ratio, clip_mask


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = DEFAULT_LOSS_AGG,
              n_tokens: float | None = None, n_seqs: float | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss over the valid positions ``mask`` ([B, T], 0/1).

    token-mean: sum(loss * mask) / n_tokens (default: mask.sum()).
    seq-mean-token-mean: sum_i (sum_t loss_it mask_it / len_i) / n_seqs (default: B).
    Pass the totals of the whole batch when ``per_token`` is one micro-batch of it.
    """
    mask = mask.to(per_token.dtype)
    if mode == "token-mean":
        denom = float(mask.sum()) if n_tokens is None else float(n_tokens)
        return (per_token * mask).sum() / max(denom, 1.0)
    if mode == "seq-mean-token-mean":
        lengths = mask.sum(dim=-1).clamp(min=1.0)
        denom = per_token.shape[0] if n_seqs is None else float(n_seqs)
        return ((per_token * mask).sum(dim=-1) / lengths).sum() / max(denom, 1.0)
    raise BadConfigError(f"unknown loss aggregation {mode!r}; known: {', '.join(LOSS_AGGS)}")


@dataclass
class GRPOLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    pg_loss: float  # policy-gradient part (same aggregation)
    kl: float  # mean k3 KL per token (0 when no reference)
    clip_fraction: float  # fraction of valid tokens whose clipped branch was taken
    ratio_mean: float
    ratio_max: float
    tokens: int  # valid tokens in this call


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_low: float = 0.2, clip_high: float | None = None, kl_coef: float = 0.0,
              ref_logp: torch.Tensor | None = None, loss_agg: str = DEFAULT_LOSS_AGG,
              n_tokens: float | None = None, n_seqs: float | None = None) -> GRPOLossOutput:
    """The GRPO loss of a padded batch.

    logp, old_logp, ref_logp, mask: [B, T] (padding positions masked out; their values are
    ignored); advantages: [B] (one per sequence) or [B, T]. ``kl_coef > 0`` needs ``ref_logp``.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    advantages = advantages.to(logp.dtype)
    maskf = mask.to(logp.dtype)
    # Padding positions may hold anything (e.g. -inf): neutralise them before exp().
    old_logp = torch.where(mask.bool(), old_logp.to(logp.dtype), logp.detach())
    pg_tok, ratio, clip_mask = clipped_surrogate(logp, old_logp, advantages, clip_low, clip_high)
    pg = aggregate(pg_tok, maskf, loss_agg, n_tokens, n_seqs)
    total = pg
    kl_val = 0.0
    if kl_coef:
        if ref_logp is None:
            raise BadConfigError("kl_coef > 0 needs ref_logp")
        ref_logp = torch.where(mask.bool(), ref_logp.to(logp.dtype), logp.detach())
        kl_tok = kl_k3(logp, ref_logp)
        total = pg + kl_coef * aggregate(kl_tok, maskf, loss_agg, n_tokens, n_seqs)
        valid = float(maskf.sum())
        kl_val = float((kl_tok.detach() * maskf).sum()) / max(valid, 1.0)
    valid = float(maskf.sum())
    with torch.no_grad():
        r = ratio.detach()
        ratio_mean = float((r * maskf).sum()) / max(valid, 1.0)
        ratio_max = float(torch.where(mask.bool(), r, torch.zeros_like(r)).max()) if valid else 1.0
        clip_fraction = float((clip_mask & mask.bool()).sum()) / max(valid, 1.0)
    return GRPOLossOutput(loss=total, pg_loss=float(pg.detach()), kl=kl_val, clip_fraction=clip_fraction,
                          ratio_mean=ratio_mean if valid else math.nan, ratio_max=ratio_max, tokens=int(valid))
