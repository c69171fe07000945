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
from typing import Iterable, Iterator, Protocol, Sequence

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
