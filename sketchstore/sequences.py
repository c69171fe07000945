"""Token sequences for batched forward passes: right padding, per-token log-probs, and the
batch format an objective hands to the factored sketcher.

One place pads sequences (:func:`right_pad`) and one computes log-probabilities of given
tokens at a sampling temperature (:func:`token_logprobs`); the objectives and the trainers
built on the store all use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), each (len(sequences), max length), padded on the right.

    Right padding keeps every real token at the position it has unpadded (position ids count
    from 0), so a padded forward reproduces each sequence's unpadded activations."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, :len(seq)] = 1
    return ids, mask


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / T)[target]`` per position, in float32.

    logits: [..., V], the logits that *predict* each target (already shifted); targets: [...]
    token ids. Returns [...]. The temperature is the one the tokens were sampled at, so the
    result is the log-probability under the distribution actually sampled from."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def select_tokens(tok_seq: torch.Tensor, index: torch.Tensor, n_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For loss tokens owned by sequences ``tok_seq``: (which tokens belong to a sequence in
    ``index``, their sequence's position in ``index``)."""
    local = torch.full((n_sequences,), -1, dtype=torch.long)
    local[index.cpu()] = torch.arange(len(index))
    where = local[tok_seq]
    chosen = where >= 0
    return chosen, where[chosen]


@dataclass
class SequenceBatch:
    """Many rows as token sequences for a few batched forward/backward passes.

    ``sequences[s]``: token ids of sequence s; ``seq_rows[s]``: the row it belongs to (a prompt with K
    sampled responses has up to K sequences, an SFT row one), non-decreasing. The loss reads the
    logits of its *loss tokens*: token j belongs to sequence ``tok_seq[j]`` (non-decreasing) and
    is predicted by the logits at position ``tok_pos[j]`` of that sequence.
    ``loss_fn(token_logits, index)``: for the sequences ``index`` (ascending LongTensor) run
    right-padded (``padded(index)``) through the model, with ``token_logits`` the (M, V) logits of
    their M loss tokens in token order (:meth:`loss_tokens`), their (len(index),) losses; summed
    over a row's sequences they give the row's loss. Sequences never interact (causal attention,
    right padding: every real token keeps its unpadded position and sees only its own sequence),
    so the gradient of a sum of these losses with respect to one sequence's activations is
    exactly its row's gradient restricted to that sequence's tokens, whichever sequences share
    the pass. ``n_tokens``/``zero_rows``: per row, the token count the per-row path records
    and whether the row's gradient is known to be exactly zero (it then has no sequence).
    """

    sequences: list[list[int]]
    seq_rows: torch.Tensor
    n_rows: int
    n_tokens: list[int]
    tok_seq: torch.Tensor
    tok_pos: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    zero_rows: list[bool]
    pad_id: int = 0

    @property
    def n_sequences(self) -> int:
        return len(self.sequences)

    def padded(self, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of the sequences ``index`` (all when None), right-padded."""
        chosen = self.sequences if index is None else [self.sequences[int(i)] for i in index]
        return right_pad(chosen, self.pad_id)

    def loss_tokens(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(local, position, slot) of the loss tokens of the sequences ``index``, in token order:
        the sequence's place in ``index``, the position of its predicting logits, and the token's
        rank among that sequence's loss tokens."""
        chosen, local = select_tokens(self.tok_seq, index, self.n_sequences)
        pos = self.tok_pos[chosen]
        first = torch.zeros(len(index) + 1, dtype=torch.long)
        first[1:] = torch.cumsum(torch.bincount(local, minlength=len(index)), 0)
        slot = torch.arange(len(local)) - first[local]
        return local, pos, slot

    def token_logits(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The (M, V) loss-token logits of full (len(index), T, V) logits of the sequences ``index``."""
        local, pos, _ = self.loss_tokens(index)
        return logits[local.to(logits.device), pos.to(logits.device)]
