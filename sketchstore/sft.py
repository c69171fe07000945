"""The built-in objective ``sft``: the gradient of a row's response log-likelihood (LESS-style)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from .data import ColumnMap, read_rows
from .errors import BadInputError
from .objectives import register_objective
from .prompts import encode_prompt
from .sequences import SequenceBatch, select_tokens, token_logprobs

DEFAULT_MAX_LENGTH = 1024
IGNORE_INDEX = -100
SFT_COLUMNS = ("id", "prompt", "response")


class SFTObjective:
    """Mean negative log-likelihood of ``response`` given ``prompt`` (the LESS-style objective).

    The prompt is formatted with the tokenizer's chat template when it has one; loss covers
    only response tokens (prompt tokens are masked) and is averaged over them.
    """

    name = "sft"

    def __init__(self, tokenizer, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def encode(self, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) for one row, labels masked on prompt tokens."""
        tok = self.tokenizer
        prompt, response = str(row["prompt"]), str(row["response"])
        prompt_ids = encode_prompt(tok, prompt)
        if getattr(tok, "chat_template", None):
            conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            full_ids = list(tok.apply_chat_template(conversation, tokenize=True, return_dict=False))
            if full_ids[: len(prompt_ids)] != prompt_ids:
                full_ids = prompt_ids + tok.encode(response, add_special_tokens=False)
        else:
            full_ids = prompt_ids + tok.encode(response, add_special_tokens=False)
            if tok.eos_token_id is not None:
                full_ids.append(tok.eos_token_id)
        full_ids = full_ids[: self.max_length]
        labels = [IGNORE_INDEX] * min(len(prompt_ids), len(full_ids)) + full_ids[len(prompt_ids):]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise BadInputError(f"row {row.get('id')!r}: no response tokens within max length {self.max_length}")
        return torch.tensor([full_ids]), torch.tensor([labels])

    def loss(self, model: nn.Module, row: dict) -> tuple[torch.Tensor, int]:
        input_ids, labels = self.encode(row)
        device = next(model.parameters()).device
        input_ids, labels = input_ids.to(device), labels.to(device)
        logits = model(input_ids=input_ids).logits[:, :-1].float()
        targets = labels[:, 1:]
        n_tokens = int((targets != IGNORE_INDEX).sum())
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           ignore_index=IGNORE_INDEX, reduction="sum") / n_tokens
        return loss, n_tokens

    def batch(self, rows: Sequence[dict]) -> SequenceBatch:
        """All ``rows`` as sequences (one per row) whose losses are exactly :meth:`loss` of each
        row: the sum of response-token NLLs over that row's token count."""
        seqs, tok_seq, tok_pos, tok_target, counts = [], [], [], [], []
        for s, row in enumerate(rows):
            input_ids, labels = self.encode(row)
            seqs.append(input_ids[0].tolist())
            targets = labels[0, 1:].tolist()  # logits at position t predict token t + 1
            kept = [t for t, label in enumerate(targets) if label != IGNORE_INDEX]
            tok_seq += [s] * len(kept)
            tok_pos += kept
            tok_target += [targets[t] for t in kept]
            counts.append(len(kept))
        tok_seq, tok_pos, tok_target = (torch.tensor(v, dtype=torch.long) for v in (tok_seq, tok_pos, tok_target))
        scale = 1.0 / torch.tensor(counts, dtype=torch.float32)[tok_seq]

        def loss_fn(token_logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            dev = token_logits.device
            chosen, local = select_tokens(tok_seq, index, len(seqs))
            nll = -token_logprobs(token_logits, tok_target[chosen].to(dev))
            per_seq = torch.zeros(len(index), dtype=nll.dtype, device=dev)
            return per_seq.index_add(0, local.to(dev), nll * scale[chosen].to(dev))

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return SequenceBatch(sequences=seqs, seq_rows=torch.arange(len(rows)), n_rows=len(rows), n_tokens=counts,
                             tok_seq=tok_seq, tok_pos=tok_pos, loss_fn=loss_fn, zero_rows=[False] * len(rows), pad_id=int(pad_id))


@register_objective
@dataclass(frozen=True)
class SFTOptions:
    """the response log-likelihood of each row of --data (id, prompt, response)."""

    name: ClassVar[str] = "sft"
    payload: ClassVar[tuple[str, ...]] = ("prompt", "response")

    def read_rows(self, data: Path | None, columns: ColumnMap | None = None) -> list[dict]:
        if data is None:
            raise BadInputError("the sft objective needs --data (rows with prompt and response)")
        return read_rows(data, required=SFT_COLUMNS, columns=columns)

    def make(self, tokenizer: Any, max_length: int) -> SFTObjective:
        return SFTObjective(tokenizer, max_length=max_length)
