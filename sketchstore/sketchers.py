"""Row sketchers: rows of an objective -> their sketches, gradient norms and token counts.

One interface (:class:`RowSketcher`), two implementations: :class:`GradientSketcher` (each
row's gradient, projected parameter by parameter during its backward by a projector of
projection.py: sparse or dense) and
``factored.FactoredSketcher`` (per-layer factors projected during backward; no full gradient
ever exists). ``build.make_sketcher`` picks one for a ProjectionSpec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from .gradients import squared_norm
from .objectives import Objective
from .projection import make_projector
from .spec import ProjectionSpec


@dataclass
class SketchedRows:
    """Sketches of a list of rows, in row order."""

    sketches: torch.Tensor  # (R, dim) float32, on the CPU
    grad_norms: list[float]
    n_tokens: list[int]
    losses: list[float] = field(default_factory=list)  # per-row losses, where the sketcher computes them


class RowSketcher(Protocol):
    """Turns rows of an objective into sketches of their gradients."""

    spec: ProjectionSpec

    def sketch_rows(self, objective: Objective, rows: Sequence[dict], batch_size: int,
                    on_row: Callable[[int], object] | None = None) -> SketchedRows:
        """Sketch ``rows``, ``batch_size`` at a time; ``on_row(n)`` after every n rows done."""
        ...


class GradientSketcher:
    """Per-row gradients projected during the row's backward, one parameter at a time.

    A post-accumulate-grad hook on every selected parameter projects its gradient (float32,
    with a batch dim of 1) as soon as backward has produced it and frees it, so at most a few
    parameters' gradients exist at once and no batch of full gradients ever does: memory is about
    the model, one row's activations and (parameters x dim) float32 contributions. The sketch is
    the float32 sum of those contributions in sorted-name order and grad_norm the float64 sum of
    squares in parameter order, exactly as projecting ``per_example_gradients`` would give them
    (bit for bit; tests/test_streamed_gradients.py). ``batch_size`` does not apply (one row per
    backward)."""

    def __init__(self, model: nn.Module, params: Sequence[tuple[str, nn.Parameter]], spec: ProjectionSpec) -> None:
        self.model = model
        self.params = list(params)
        self.spec = spec
        self.projector = make_projector(spec)
        self._contribs: dict[str, torch.Tensor] = {}
        self._squares: dict[str, torch.Tensor] = {}

    def sketch_rows(self, objective: Objective, rows: Sequence[dict], batch_size: int,
                    on_row: Callable[[int], object] | None = None) -> SketchedRows:
        sketches, norms, tokens = [], [], []
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        for _, p in self.params:
            p.requires_grad_(True)
        handles = [p.register_post_accumulate_grad_hook(self._hook(name)) for name, p in self.params]
        try:
            for row in rows:
                self._contribs, self._squares = {}, {}
                self.model.zero_grad(set_to_none=True)
                loss, n_tokens = objective.loss(self.model, row)
                if loss is not None and loss.requires_grad:
                    loss.backward()
                sketch, norm = self._finish_row()
                sketches.append(sketch)
                norms.append(norm)
                tokens.append(n_tokens)
                if on_row is not None:
                    on_row(1)
        finally:
            for handle in handles:
                handle.remove()
            self.model.zero_grad(set_to_none=True)
            for p, flag in flags:
                p.requires_grad_(flag)
            self._contribs, self._squares = {}, {}
        return SketchedRows(torch.cat(sketches) if sketches else torch.zeros(0, self.spec.dim), norms, tokens)

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            grad = param.grad.detach().float().unsqueeze(0)
            param.grad = None
            self._squares[name] = squared_norm(grad)
            self._contribs[name] = self.projector.project_param(name, grad)
        return hook

    def _finish_row(self) -> tuple[torch.Tensor, float]:
        """(1, dim) sketch and gradient norm of the row whose backward just ran; parameters that
        got no gradient count as zero."""
        device = next(self.model.parameters()).device
        sketch = torch.zeros(1, self.spec.dim, dtype=torch.float32, device=device)
        for name in sorted(name for name, _ in self.params):
            contrib = self._contribs.get(name)
            if contrib is not None:
                sketch += contrib
        squares = [self._squares.get(name, torch.zeros((), dtype=torch.float64, device=device)) for name, _ in self.params]
        return sketch.cpu(), float(torch.sqrt(sum(squares)))
