"""Per-example gradients of a training objective, as named parameter tensors.

An objective turns one data row into a scalar loss on a model; ``per_example_gradients``
runs one backward per row (the paper-faithful path) and yields the gradient of each
selected parameter, never concatenated into one vector.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch
from torch import nn

from .errors import BadInputError

DEFAULT_MAX_LENGTH = 1024
IGNORE_INDEX = -100


class Objective(Protocol):
    """A per-row loss. ``loss`` returns (scalar loss, number of tokens it covers); a loss of
    None means the gradient is known to be exactly zero (no backward is run)."""

    name: str

    def loss(self, model: nn.Module, row: dict) -> tuple[torch.Tensor | None, int]: ...


@dataclass
class GradientRow:
    """One row's gradient: named tensors (each with a leading batch dim of 1) and facts about it."""

    row: dict
    grads: dict[str, torch.Tensor]
    n_tokens: int
    loss: float
    grad_norm: float


@dataclass
class SequenceBatch:
    """Many rows as token sequences for a few batched forward/backward passes.

    ``sequences[s]``: token ids of sequence s; ``seq_rows[s]``: the row it belongs to (a POPI
    prompt has up to K sequences, an SFT row one), non-decreasing. ``loss_fn(logits, index)``:
    for the sequences ``index`` (LongTensor) run right-padded (``padded(index)``) through the
    model, with (len(index), T, V) logits, their (len(index),) losses; summed over a row's
    sequences they give the row's loss. Sequences never interact (causal attention, right
    padding: every real token keeps its unpadded position and sees only its own sequence),
    so the gradient of a sum of these losses with respect to one sequence's activations is
    exactly its row's gradient restricted to that sequence's tokens, whichever sequences share
    the pass. ``n_tokens``/``zero_rows``: per row, the token count the per-row path records
    and whether the row's gradient is known to be exactly zero (it then has no sequence).
    """

    sequences: list[list[int]]
    seq_rows: torch.Tensor
    n_rows: int
    n_tokens: list[int]
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


def select_tokens(tok_seq: torch.Tensor, index: torch.Tensor, n_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For loss tokens owned by sequences ``tok_seq``: (which tokens belong to a sequence in
    ``index``, their sequence's position in ``index``)."""
    local = torch.full((n_sequences,), -1, dtype=torch.long)
    local[index.cpu()] = torch.arange(len(index))
    where = local[tok_seq]
    chosen = where >= 0
    return chosen, where[chosen]


def load_model(model_dir: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load a local Hugging Face causal LM and its tokenizer; errors name the directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise BadInputError(f"model directory {path} has no config.json (expected a local Hugging Face checkpoint)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError) as err:
        raise BadInputError(f"cannot load model from {path}: {str(err).splitlines()[0]}") from err
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as err:
        raise BadInputError(f"device {device!r} is not usable here: {str(err).splitlines()[0]}") from err
    model.eval()
    return model, tokenizer


def select_parameters(model: nn.Module, include: Sequence[str] | None = None) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters whose names match any of the ``include`` glob patterns (all when None)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if include:
        params = [(n, p) for n, p in params if any(fnmatch.fnmatchcase(n, pat) for pat in include)]
        if not params:
            raise BadInputError(f"no model parameter matches {', '.join(include)}")
    return params


def parameter_shapes(params: Iterable[tuple[str, nn.Parameter]]) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in params]


def model_fingerprint(params: Iterable[tuple[str, nn.Parameter]]) -> str:
    """Hash of the selected parameters' names and values: tells two checkpoints apart."""
    digest = hashlib.sha256()
    for name, param in sorted(params, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


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
        if getattr(tok, "chat_template", None):
            user = [{"role": "user", "content": prompt}]
            prompt_ids = list(tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False))
            full_ids = list(tok.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=True, return_dict=False))
            if full_ids[: len(prompt_ids)] != prompt_ids:
                full_ids = prompt_ids + tok.encode(response, add_special_tokens=False)
        else:
            prompt_ids = tok.encode(prompt)
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

        def loss_fn(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            dev = logits.device
            chosen, local = select_tokens(tok_seq, index, len(seqs))
            local = local.to(dev)
            step = logits[local, tok_pos[chosen].to(dev)].float()
            nll = -torch.log_softmax(step, dim=-1).gather(1, tok_target[chosen].to(dev)[:, None]).squeeze(1)
            per_seq = torch.zeros(len(index), dtype=nll.dtype, device=dev)
            return per_seq.index_add(0, local, nll * scale[chosen].to(dev))

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return SequenceBatch(sequences=seqs, seq_rows=torch.arange(len(rows)), n_rows=len(rows), n_tokens=counts,
                             loss_fn=loss_fn, zero_rows=[False] * len(rows), pad_id=int(pad_id))


def per_example_gradients(model: nn.Module, objective: Objective, rows: Iterable[dict],
                          params: Sequence[tuple[str, nn.Parameter]]) -> Iterator[GradientRow]:
    """One backward per row; yields float32 named gradients of the selected parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    for row in rows:
        model.zero_grad(set_to_none=True)
        loss, n_tokens = objective.loss(model, row)
        if loss is not None and loss.requires_grad:
            loss.backward()
        grads = {}
        for name, p in params:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            grads[name] = g.detach().float().unsqueeze(0)
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
        yield GradientRow(row=row, grads=grads, n_tokens=n_tokens,
                          loss=0.0 if loss is None else float(loss.detach()), grad_norm=norm)
    model.zero_grad(set_to_none=True)
