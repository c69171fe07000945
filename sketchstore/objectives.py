"""Objectives: what a sketch is the gradient of, and which rows a build sketches.

An objective *kind* is a dataclass of options registered under a name. It reads the rows to
sketch (:meth:`ObjectiveOptions.read_rows`, with the data's :class:`~sketchstore.data.ColumnMap`) and makes the per-row loss
(:meth:`ObjectiveOptions.make`), an :class:`Objective`. The store knows one kind, ``sft``
(:mod:`sketchstore.sft`); other packages add theirs with :func:`register_objective`, or
through the ``sketchstore.objectives`` entry-point group so that ``sketch build --objective
NAME`` finds them without sketchstore importing them (cropi registers ``popi`` that way).
The options' fields become ``sketch build`` flags, with the help text of their metadata.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from .data import ColumnMap
from .errors import BadInputError
from .sequences import SequenceBatch

ENTRY_POINT_GROUP = "sketchstore.objectives"


class Objective(Protocol):
    """A per-row loss. ``loss`` returns (scalar loss, number of tokens it covers); a loss of
    None means the gradient is known to be exactly zero (no backward is run). ``batch`` gives
    many rows as one :class:`SequenceBatch` (the factored sketcher's input)."""

    name: str

    def loss(self, model: nn.Module, row: dict) -> tuple[torch.Tensor | None, int]: ...

    def batch(self, rows: list[dict]) -> SequenceBatch: ...


class ObjectiveOptions(Protocol):
    """The options of one objective kind: a dataclass whose class attributes say its ``name`` and
    which row keys are its ``payload`` (what the loss reads; every other key of a row is stored as
    metadata in the catalog)."""

    name: ClassVar[str]
    payload: ClassVar[tuple[str, ...]]

    def read_rows(self, data: Path | None, columns: ColumnMap | None = None) -> list[dict]: ...

    def make(self, tokenizer: Any, max_length: int) -> Objective: ...


_REGISTRY: dict[str, type] = {}
_UNAVAILABLE: dict[str, str] = {}  # entry points that failed to load: name -> reason
_LOADED_ENTRY_POINTS = False


def register_objective(options: type) -> type:
    """Register an options dataclass under its ``name`` (usable as a class decorator)."""
    if not dataclasses.is_dataclass(options) or not isinstance(getattr(options, "name", None), str):
        raise TypeError(f"{options!r}: an objective kind is a dataclass with a class attribute `name`")
    _REGISTRY[options.name] = options
    _UNAVAILABLE.pop(options.name, None)
    return options


def _load_entry_points() -> None:
    global _LOADED_ENTRY_POINTS
    if _LOADED_ENTRY_POINTS:
        return
    _LOADED_ENTRY_POINTS = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in _REGISTRY:
            continue
        try:
            register_objective(entry.load())
        except Exception as err:  # a broken or absent plugin must not break the other objectives
            _UNAVAILABLE[entry.name] = f"{entry.value} failed to load ({type(err).__name__}: {err})"


def objective_kinds() -> dict[str, type]:
    """Every registered objective kind, by name (built-in: ``sft``, registered when the package
    is imported; and entry points)."""
    _load_entry_points()
    return dict(_REGISTRY)


def objective_options(objective: str | ObjectiveOptions, **values: Any) -> ObjectiveOptions:
    """The options of ``objective``: given as an options instance (returned as is) or by name,
    built from ``values``; an unknown name, an unknown option or a missing one is a BadInputError."""
    if not isinstance(objective, str):
        if objective.name not in objective_kinds():
            raise BadInputError(f"objective {objective.name!r} is not registered")
        return objective
    kinds = objective_kinds()
    if objective not in kinds:
        why = f" ({_UNAVAILABLE[objective]})" if objective in _UNAVAILABLE else ""
        raise BadInputError(f"unknown objective {objective!r}{why}; choose one of {', '.join(sorted(kinds))}")
    cls = kinds[objective]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise BadInputError(f"the {objective} objective has no option {unknown[0]!r}")
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise BadInputError(f"the {objective} objective needs {', '.join('--' + m.replace('_', '-') for m in missing)}")
    return cls(**values)
