"""The policy being trained: an HF causal LM with float32 master weights, and the log-probs
of sampled responses under it (at the sampling temperature)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from sketchstore.sequences import right_pad, token_logprobs

from .trajectory import Trajectory


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """No transformers progress bars ("Loading weights", "Writing model shards") inside."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_causal_lm(model_dir: str | os.PathLike, device: torch.device) -> torch.nn.Module:
    """A float32 HF causal LM on ``device`` (bfloat16 training means autocast over float32 weights)."""
    from transformers import AutoModelForCausalLM

    with quiet_hf():
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)


@dataclass
class ResponseSeq:
    """One sampled response prepared for the update: prompt + response ids and what the loss needs."""

    ids: list[int]  # prompt + response
    start: int  # index in ids of the first response token
    n_resp: int
    advantage: float
    old_logp: list[float]
    mb: int = 0  # mini-batch index

    @classmethod
    def from_trajectory(cls, t: Trajectory) -> "ResponseSeq":
        p, y = t.prompt_token_ids, t.response_token_ids
        return cls(ids=list(p) + list(y), start=len(p), n_resp=len(y), advantage=float(t.advantage),
                   old_logp=list(t.behaviour_logprobs))


class Policy:
    """A model and how its log-probs are taken: ``temperature`` of the samples, ``dtype``
    ("float32" or "bfloat16" autocast), ``share_prompt`` (see :meth:`logprobs`)."""

    def __init__(self, model: torch.nn.Module, tokenizer, temperature: float, dtype: str = "float32",
                 share_prompt: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.dtype = dtype
        self.share_prompt = share_prompt
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id or 0

    def autocast(self):
        if self.dtype == "bfloat16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def logprobs(self, seqs: Sequence[ResponseSeq], model: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] log-probs of the response tokens under ``model`` (default: the policy), and the
        mask; T = the longest response. With ``share_prompt`` each distinct prompt goes through
        the model once and its KV cache is gathered for its K responses (same values, ~2x fewer
        tokens when prompts are as long as responses); otherwise one right-padded forward."""
        model = self.model if model is None else model
        if self.share_prompt:
            shared = self._shared_prompt_logprobs(model, seqs)
            if shared is not None:
                return shared
        t_max = max(s.n_resp for s in seqs)
        ids, attn = right_pad([s.ids for s in seqs], self.pad_id)
        pos = torch.zeros((len(seqs), t_max), dtype=torch.long)
        tgt = torch.full((len(seqs), t_max), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), t_max), dtype=torch.bool)
        for i, s in enumerate(seqs):
            pos[i, : s.n_resp] = torch.arange(s.start - 1, s.start - 1 + s.n_resp)
            tgt[i, : s.n_resp] = torch.tensor(s.ids[s.start:])
            mask[i, : s.n_resp] = True
        ids, attn, pos, tgt, mask = (t.to(self.device) for t in (ids, attn, pos, tgt, mask))
        with self.autocast():
            logits = model(input_ids=ids, attention_mask=attn).logits
        step_logits = logits.gather(1, pos[:, :, None].expand(-1, -1, logits.shape[-1]))
        return token_logprobs(step_logits, tgt, self.temperature), mask

    def _shared_prompt_logprobs(self, model, seqs: Sequence[ResponseSeq]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Prompts once (right-padded, KV cached), responses on the gathered cache with explicit
        position ids (the padding gap between a short prompt and its response is masked out).
        None when no prompt repeats (nothing to share)."""
        index: dict[tuple[int, ...], int] = {}
        rows = [index.setdefault(tuple(s.ids[: s.start]), len(index)) for s in seqs]
        if len(index) == len(seqs):
            return None
        p_ids, p_mask = right_pad(list(index), self.pad_id)
        p_len = p_mask.sum(1)
        r_ids, r_mask = right_pad([s.ids[s.start:] for s in seqs], self.pad_id)
        t_max = r_ids.shape[1]
        idx = torch.tensor(rows, dtype=torch.long)
        full_mask = torch.cat([p_mask[idx], r_mask], dim=1)
        positions = p_len[idx][:, None] + torch.arange(t_max)[None, :]
        dev = self.device
        with self.autocast():
            first = model(input_ids=p_ids.to(dev), attention_mask=p_mask.to(dev), use_cache=True)
            cache = first.past_key_values
            cache.batch_select_indices(idx.to(dev))
            last = first.logits[torch.arange(len(index), device=dev), (p_len - 1).to(dev)]  # predicts token 0
            second = model(input_ids=r_ids.to(dev), attention_mask=full_mask.to(dev), position_ids=positions.to(dev),
                           past_key_values=cache, use_cache=True)
        step_logits = torch.cat([last[idx.to(dev)][:, None, :], second.logits[:, :-1]], dim=1)
        r_ids, r_mask = r_ids.to(dev), r_mask.to(dev).bool()
        return token_logprobs(step_logits, r_ids, self.temperature), r_mask
