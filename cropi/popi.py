"""POPI: the off-policy estimate of a prompt's policy gradient from stored trajectories.

For prompt s with K trajectories y_1..y_K sampled by a behaviour policy beta, at the current
policy theta (CROPI, arXiv 2510.26491, eq. for POPI):

    L(s) = -(1/K) sum_i (1/|y_i|) sum_t rho_{i,t} A_i,
    rho_{i,t} = exp(log pi_theta(y_{i,t} | s, y_{i,<t}) - log pi_beta(y_{i,t} | ...)),

with A_i the GRPO group advantage stored with the trajectory. Its gradient is
-(1/K) sum_i (1/|y_i|) sum_t rho_{i,t} A_i grad log pi_theta(y_{i,t}): the policy gradient
reweighted by importance ratios, so no fresh rollouts are needed.

Choices (documented in the README):
- pi_theta is evaluated at the temperature the trajectory was sampled at (log_softmax of
  logits / T), matching behaviour log-probs stored from the distribution actually sampled
  (vLLM processed log-probs). The reference recomputes behaviour log-probs at T = 1 instead.
  Trajectories sampled with top_p < 1 are refused: their behaviour probabilities are
  renormalised over a nucleus that pi_theta would not see.
- No clipping and no KL by default (as the reference). ``clip`` > 0 uses the PPO-clipped
  surrogate min(rho A, clip(rho, 1-clip, 1+clip) A) per token instead of rho A.
- A prompt whose K rewards are all equal has A = 0 for every trajectory: its gradient is
  exactly zero, so it is stored as a zero-gradient row without a forward pass.
- The K trajectories of a prompt go through one padded forward; one backward per prompt.
  :meth:`POPIObjective.batch` instead turns the trajectories of many prompts into one batch of
  sequences (for the factored sketches: a few forward/backward passes for all of them); each
  kept trajectory is a sequence whose token weights rho_{i,t} A_i / (K |y_i|) enter through the
  backward, and all K sequences of a prompt map to that prompt's row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from sketchstore.data import ColumnMap, read_rows
from sketchstore.objectives import register_objective
from sketchstore.options import option
from sketchstore.sequences import SequenceBatch, right_pad, select_tokens, token_logprobs

from .checks import check_float
from .errors import BadConfigError
from .trajectory import Trajectory, from_rows, read_trajectories

GROUP_METADATA = ("behaviour", "pass_rate", "zero_std")
# The trajectory columns POPI reads (stores written by other tools need only these).
POPI_COLUMNS = ("prompt_id", "behaviour", "sample", "prompt_token_ids", "response_token_ids", "behaviour_logprobs",
                "temperature", "top_p", "reward", "advantage", "pass_rate", "zero_std")


@dataclass
class PromptGroup:
    """The K stored trajectories of one prompt, as POPI reads them."""

    prompt_id: str
    prompt_token_ids: list[int]
    responses: list[list[int]]
    behaviour_logprobs: list[list[float]]
    advantages: list[float]
    rewards: list[float]
    temperature: float
    metadata: dict

    @classmethod
    def from_trajectories(cls, trajectories: list[Trajectory]) -> "PromptGroup":
        first = trajectories[0]
        return cls(prompt_id=first.prompt_id, prompt_token_ids=list(first.prompt_token_ids),
                   responses=[list(t.response_token_ids) for t in trajectories],
                   behaviour_logprobs=[list(t.behaviour_logprobs) for t in trajectories],
                   advantages=[float(t.advantage) for t in trajectories], rewards=[float(t.reward) for t in trajectories],
                   temperature=float(first.temperature), metadata={k: getattr(first, k) for k in GROUP_METADATA})

    @property
    def zero_advantage(self) -> bool:
        return all(a == 0 for a in self.advantages)


def read_prompt_groups(path: str | os.PathLike, behaviour: str | None = None) -> list[dict]:
    """Trajectories grouped by prompt, as build rows: ``{"id", "group": PromptGroup, metadata...}``."""
    path = Path(path)
    if not path.exists():
        raise BadConfigError(f"trajectories not found: {path}")
    table = read_trajectories(path, columns=POPI_COLUMNS)
    behaviours = set(table.column("behaviour").to_pylist())
    if behaviour is None and len(behaviours) > 1:
        raise BadConfigError(f"{path}: trajectories of several behaviour policies ({', '.join(sorted(behaviours))}); pick one")
    if behaviour is not None and behaviour not in behaviours:
        raise BadConfigError(f"{path}: no trajectories of behaviour {behaviour!r} (has {', '.join(sorted(behaviours))})")
    groups: dict[str, list[Trajectory]] = {}
    for t in from_rows(table.to_pylist()):
        if behaviour is None or t.behaviour == behaviour:
            groups.setdefault(str(t.prompt_id), []).append(t)
    out = []
    for prompt_id, trajectories in groups.items():
        trajectories.sort(key=lambda t: t.sample)
        if any(t.top_p < 1.0 for t in trajectories):
            raise BadConfigError(f"{path}: prompt {prompt_id!r} was sampled with top_p < 1; POPI needs top_p = 1")
        if len({t.temperature for t in trajectories}) != 1:
            raise BadConfigError(f"{path}: prompt {prompt_id!r} mixes sampling temperatures")
        for t in trajectories:
            if len(t.response_token_ids) != len(t.behaviour_logprobs):
                raise BadConfigError(f"{path}: prompt {prompt_id!r} sample {t.sample}: token and log-prob counts differ")
        group = PromptGroup.from_trajectories(trajectories)
        out.append({"id": prompt_id, "group": group, "k": len(trajectories),
                    "reward_mean": sum(group.rewards) / len(group.rewards), **group.metadata})
    if not out:
        raise BadConfigError(f"{path}: no trajectories")
    return out


def response_logprobs(model: nn.Module, prompt: list[int], responses: list[list[int]],
                      temperature: float) -> list[torch.Tensor]:
    """log pi(y_t | prompt, y_<t) at ``temperature`` for each response, from one padded forward."""
    device = next(model.parameters()).device
    ids, mask = right_pad([prompt + response for response in responses])
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    start = len(prompt) - 1
    return [token_logprobs(logits[i, start:start + len(response)], torch.tensor(response, device=device), temperature)
            for i, response in enumerate(responses)]


class POPIObjective:
    """Per-prompt POPI loss over stored trajectories (see the module docstring)."""

    name = "popi"

    def __init__(self, clip: float = 0.0) -> None:
        self.clip = check_float("clip", clip, 0.0)

    def loss(self, model: nn.Module, row: dict) -> tuple[torch.Tensor | None, int]:
        group: PromptGroup = row["group"]
        n_tokens = sum(len(r) for r in group.responses)
        kept = [i for i, r in enumerate(group.responses) if r and group.advantages[i] != 0]
        if not kept:
            return None, n_tokens
        logps = response_logprobs(model, group.prompt_token_ids, [group.responses[i] for i in kept], group.temperature)
        total = torch.zeros((), device=logps[0].device)
        for i, logp in zip(kept, logps):
            behaviour = torch.tensor(group.behaviour_logprobs[i], device=logp.device)
            rho = torch.exp(logp - behaviour)
            advantage = group.advantages[i]
            surrogate = rho * advantage
            if self.clip > 0:
                surrogate = torch.minimum(surrogate, rho.clamp(1 - self.clip, 1 + self.clip) * advantage)
            total = total + surrogate.mean()
        return -total / len(group.responses), n_tokens

    def batch(self, rows: list[dict]) -> SequenceBatch:
        """The kept trajectories (non-empty, A_i != 0) of all ``rows`` as sequences of one batch.

        Per-sequence loss of trajectory i of a prompt with K trajectories:
        -(1/(K |y_i|)) sum_t surrogate_{i,t} (surrogate = rho A_i, or its clipped form), so the
        sum over a prompt's sequences is exactly :meth:`loss`. A prompt with no kept trajectory
        (all advantages zero) contributes no sequence and is flagged in ``zero_rows``.
        """
        seqs, seq_rows, n_tokens, zero_rows = [], [], [], []
        tok_seq, tok_pos, tok_target, tok_behaviour, tok_temp, tok_adv, tok_scale = [], [], [], [], [], [], []
        for r, row in enumerate(rows):
            group: PromptGroup = row["group"]
            n_tokens.append(sum(len(y) for y in group.responses))
            kept = [i for i, y in enumerate(group.responses) if y and group.advantages[i] != 0]
            zero_rows.append(not kept)
            start = len(group.prompt_token_ids) - 1
            for i in kept:
                response = group.responses[i]
                s = len(seqs)
                seqs.append(list(group.prompt_token_ids) + list(response))
                seq_rows.append(r)
                n = len(response)
                tok_seq += [s] * n
                tok_pos += range(start, start + n)  # logits at position t predict token t + 1
                tok_target += response
                tok_behaviour += group.behaviour_logprobs[i]
                tok_temp += [group.temperature] * n
                tok_adv += [group.advantages[i]] * n
                tok_scale += [1.0 / (len(group.responses) * n)] * n
        tok_seq = torch.tensor(tok_seq, dtype=torch.long)
        tok_pos, target = torch.tensor(tok_pos, dtype=torch.long), torch.tensor(tok_target, dtype=torch.long)
        behaviour, temp, adv, scale = (torch.tensor(v, dtype=torch.float32)
                                       for v in (tok_behaviour, tok_temp, tok_adv, tok_scale))
        clip = self.clip

        def loss_fn(token_logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            dev = token_logits.device
            chosen, local = select_tokens(tok_seq, index, len(seqs))
            local = local.to(dev)
            step = token_logits.float() / temp[chosen].to(dev)[:, None]
            logp = torch.log_softmax(step, dim=-1).gather(1, target[chosen].to(dev)[:, None]).squeeze(1)
            rho = torch.exp(logp - behaviour[chosen].to(dev))
            a = adv[chosen].to(dev)
            surrogate = rho * a
            if clip > 0:
                surrogate = torch.minimum(surrogate, rho.clamp(1 - clip, 1 + clip) * a)
            per_seq = torch.zeros(len(index), dtype=surrogate.dtype, device=dev)
            return -per_seq.index_add(0, local, surrogate * scale[chosen].to(dev))

        return SequenceBatch(sequences=seqs, seq_rows=torch.tensor(seq_rows, dtype=torch.long), n_rows=len(rows),
                             n_tokens=n_tokens, tok_seq=tok_seq, tok_pos=tok_pos, loss_fn=loss_fn, zero_rows=zero_rows)


@register_objective
@dataclass(frozen=True)
class POPIOptions:
    """the off-policy policy gradient of each prompt of --trajectories (from `cropi rollout`)."""

    name: ClassVar[str] = "popi"
    payload: ClassVar[tuple[str, ...]] = ("group",)

    trajectories: Path = option(help="Rollout trajectories (from `cropi rollout`) for the popi objective.")
    behaviour: str | None = option(None, "popi: the behaviour policy to use when the trajectories hold several.")
    popi_clip: float = option(0.0, "popi: PPO clip range of the importance ratio (0: no clipping, as the reference).")

    def __post_init__(self) -> None:
        object.__setattr__(self, "trajectories", Path(self.trajectories))
        check_float("popi_clip", self.popi_clip, 0.0)

    def read_rows(self, data: Path | None, columns: ColumnMap | None = None) -> list[dict]:
        """Prompt groups of the trajectories; restricted to (and given metadata from) ``data`` when given."""
        rows = read_prompt_groups(self.trajectories, self.behaviour)
        if data is None:
            return rows
        extra = {r["id"]: r for r in read_rows(data, required=("id",), columns=columns)}
        payload = ("id",) + self.payload
        return [{**{k: v for k, v in extra[r["id"]].items() if k not in payload and k not in ("prompt", "response")}, **r}
                for r in rows if r["id"] in extra]

    def make(self, tokenizer: Any, max_length: int) -> POPIObjective:
        return POPIObjective(clip=self.popi_clip)
