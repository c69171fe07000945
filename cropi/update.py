"""One GRPO update: the policy's clipped-surrogate step(s) on a batch of sampled trajectories.

Denominators are the token / sequence counts of the whole (mini-)batch as sampled,
zero-advantage groups included; those groups are skipped in the forward/backward (their loss
terms are exactly 0 when ``kl_coef == 0``) but counted. With ``kl_coef > 0`` they are kept
(the KL term has a gradient) and ``reference`` (a frozen copy of the initial policy) is
needed. ``grad_accum`` splits each mini-batch into micro-batches (memory only: the result
equals one big batch up to float summation order). ``mini_batches > 1``: contiguous groups
of prompts per optimiser update; the later ones see a changed policy and the clip acts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch

from .grpo import grpo_loss
from .policy import Policy, ResponseSeq
from .train_config import TrainConfig
from .trajectory import Trajectory


@dataclass(frozen=True)
class UpdateSettings:
    """The TrainConfig fields an update reads."""

    n: int
    mini_batches: int = 1
    grad_accum: int = 1
    clip_low: float = 0.2
    clip_high: float | None = None
    kl_coef: float = 0.0
    loss_agg: str = "token-mean"
    old_logprobs: str = "behaviour"
    max_grad_norm: float | None = 1.0

    @classmethod
    def of(cls, config: TrainConfig) -> "UpdateSettings":
        return cls(n=config.n, mini_batches=config.mini_batches, grad_accum=config.grad_accum,
                   clip_low=config.clip_low, clip_high=config.clip_high, kl_coef=config.kl_coef,
                   loss_agg=config.loss_agg, old_logprobs=config.old_logprobs, max_grad_norm=config.max_grad_norm)


@dataclass
class UpdateStats:
    loss: float = 0.0
    pg_loss: float = 0.0
    kl: float = 0.0
    clip_frac: float = 0.0
    ratio_mean: float = math.nan
    ratio_max: float = math.nan
    grad_norm: float = math.nan
    updates: int = 0
    seqs_trained: int = 0

    def to_record(self) -> dict[str, Any]:
        """The stats as log fields (NaN as None, for JSON)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def make_optimizer(model: torch.nn.Module, lr: float, betas: tuple[float, float],
                   weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only."""
    decay = [p for _, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)


def _chunks(items: list, size: int) -> Iterable[list]:
    size = max(1, size)
    for i in range(0, len(items), size):
        yield items[i: i + size]


def grpo_update(policy: Policy, optimizer: torch.optim.Optimizer, trajectories: Sequence[Trajectory],
                settings: UpdateSettings, reference: torch.nn.Module | None = None) -> UpdateStats:
    """Policy update(s) on one sampled batch (whole groups of ``settings.n`` in order)."""
    s = settings
    seqs = [ResponseSeq.from_trajectory(t) for t in trajectories]
    per_mb = math.ceil((len(trajectories) // s.n) / s.mini_batches)
    for i, seq in enumerate(seqs):
        seq.mb = (i // s.n) // per_mb
    n_mb = max(seq.mb for seq in seqs) + 1 if seqs else 0
    keep = [q for q in seqs if q.n_resp > 0 and (q.advantage != 0.0 or s.kl_coef > 0)]
    stats = UpdateStats(seqs_trained=len(keep))
    if not keep:
        return stats
    if s.old_logprobs == "recompute":
        with torch.no_grad():
            for chunk in _chunks(keep, math.ceil(len(keep) / s.grad_accum)):
                logp, mask = policy.logprobs(chunk)
                for q, row, m in zip(chunk, logp.float().cpu(), mask.cpu()):
                    q.old_logp = row[m].tolist()
    tokens_seen, ratio_sum, ratio_max, clip_sum, kl_sum, grad_norms = 0, 0.0, 0.0, 0.0, 0.0, []
    loss_total, pg_total = 0.0, 0.0
    for mb in range(n_mb):
        mb_all = [q for q in seqs if q.mb == mb]
        mb_keep = [q for q in keep if q.mb == mb]
        if not mb_keep:
            continue
        n_tokens = sum(q.n_resp for q in mb_all)
        optimizer.zero_grad(set_to_none=True)
        for chunk in _chunks(mb_keep, math.ceil(len(mb_keep) / s.grad_accum)):
            logp, mask = policy.logprobs(chunk)
            old = torch.zeros_like(logp)
            for i, q in enumerate(chunk):
                old[i, : q.n_resp] = torch.tensor(q.old_logp, dtype=old.dtype)
            adv = torch.tensor([q.advantage for q in chunk], dtype=logp.dtype, device=logp.device)
            ref = None
            if reference is not None:
                with torch.no_grad():
                    ref, _ = policy.logprobs(chunk, model=reference)
            out = grpo_loss(logp, old, adv, mask, clip_low=s.clip_low, clip_high=s.clip_high, kl_coef=s.kl_coef,
                            ref_logp=ref, loss_agg=s.loss_agg, n_tokens=n_tokens, n_seqs=len(mb_all))
            out.loss.backward()
            loss_total += float(out.loss.detach())
            pg_total += out.pg_loss
            tokens_seen += out.tokens
            ratio_sum += out.ratio_mean * out.tokens
            ratio_max = max(ratio_max, out.ratio_max)
            clip_sum += out.clip_fraction * out.tokens
            kl_sum += out.kl * out.tokens
        params = policy.model.parameters()
        if s.max_grad_norm is not None:
            gn = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        else:
            gn = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None))
        grad_norms.append(float(gn))
        optimizer.step()
        stats.updates += 1
    optimizer.zero_grad(set_to_none=True)
    updates = max(stats.updates, 1)
    stats.loss, stats.pg_loss = loss_total / updates, pg_total / updates
    stats.kl, stats.clip_frac = kl_sum / max(tokens_seen, 1), clip_sum / max(tokens_seen, 1)
    stats.ratio_mean, stats.ratio_max = ratio_sum / max(tokens_seen, 1), ratio_max
    stats.grad_norm = sum(grad_norms) / len(grad_norms) if grad_norms else math.nan
    return stats
