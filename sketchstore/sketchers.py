"""Row sketchers: rows of an objective -> their sketches, gradient norms and token counts.

One interface (:class:`RowSketcher`), two implementations: :class:`GradientSketcher` (each
row's full gradient, then a projector of projection.py: sparse or dense) and
``factored.FactoredSketcher`` (per-layer factors projected during backward; no full gradient
ever exists). ``build.make_sketcher`` picks one for a ProjectionSpec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from .gradients import per_example_gradients
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
    """Per-row gradients (gradients.per_example_gradients), projected ``batch_size`` rows at a time."""

    def __init__(self, model: nn.Module, params: Sequence[tuple[str, nn.Parameter]], spec: ProjectionSpec) -> None:
        self.model = model
        self.params = list(params)
        self.spec = spec
        self.projector = make_projector(spec)

    def sketch_rows(self, objective: Objective, rows: Sequence[dict], batch_size: int,
                    on_row: Callable[[int], object] | None = None) -> SketchedRows:
        sketches, norms, tokens, pending = [], [], [], []
        for item in per_example_gradients(self.model, objective, rows, self.params):
            pending.append(item)
            if len(pending) == batch_size:
                sketches.append(self._project(pending))
                pending = []
            norms.append(item.grad_norm)
            tokens.append(item.n_tokens)
            if on_row is not None:
                on_row(1)
        if pending:
            sketches.append(self._project(pending))
        return SketchedRows(torch.cat(sketches) if sketches else torch.zeros(0, self.spec.dim), norms, tokens)

    def _project(self, items: Sequence) -> torch.Tensor:
        names = items[0].grads.keys()
        stacked = {n: torch.cat([it.grads[n] for it in items]) for n in names}
        return self.projector.project(stacked).cpu()
