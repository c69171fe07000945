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
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from .errors import BadInputError
from .objectives import Objective

NORM_CHUNK = 1 << 20  # elements per float64 chunk in squared_norm (8 MiB of float64 at a time)


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
    """Hash of the selected parameters' names and values (and dtype, unless float32): tells two
    checkpoints, or one checkpoint loaded in two compute dtypes, apart."""
    digest = hashlib.sha256()
    for name, param in sorted(params, key=lambda item: item[0]):
        digest.update(name.encode())
        if param.dtype != torch.float32:
            digest.update(str(param.dtype).encode())
        digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    """float64 sum of squares of ``tensor``, NORM_CHUNK elements at a time: never a float64 copy of
    the whole tensor (for SmolLM2's 28M-entry embedding gradient that copy and its square were
    0.46 GiB of the build's peak). Every sketcher uses it, so their norms agree bit for bit."""
    flat = tensor.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=tensor.device)
    for start in range(0, flat.numel(), NORM_CHUNK):
        total += flat[start:start + NORM_CHUNK].double().pow(2).sum()
    return total


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
        norm = float(torch.sqrt(sum(squared_norm(g) for g in grads.values())))
        yield GradientRow(row=row, grads=grads, n_tokens=n_tokens,
                          loss=0.0 if loss is None else float(loss.detach()), grad_norm=norm)
    model.zero_grad(set_to_none=True)
