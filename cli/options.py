"""Click options generated from the library's argument dataclasses, so flags, defaults and help
text have one source (the dataclass fields and their ``sketchstore.options.option`` metadata)."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import click

from sketchstore.options import CHOICES, FLAG, HELP

_SCALARS = {int: int, float: float, str: str, Path: click.Path(path_type=Path)}


def flag_of(field: dataclasses.Field) -> str:
    """The flag name of a field (``--flag-name``)."""
    return field.metadata.get(FLAG) or field.name.replace("_", "-")


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else str), True
    return kind, False


def _click_option(field: dataclasses.Field, kind: Any, default: Any, required: bool) -> Callable:
    name = flag_of(field)
    help_text = field.metadata.get(HELP, "")
    kind, _ = _unwrap_optional(kind)
    if kind is bool:
        return click.option(f"--{name}/--no-{name}", field.name, default=default, show_default=True, help=help_text)
    if typing.get_origin(kind) is tuple and typing.get_args(kind)[-1] is Ellipsis:  # a comma-separated list
        item = typing.get_args(kind)[0]
        return click.option(f"--{name}", field.name, default=",".join(map(str, default)) if default else None,
                            required=required, show_default=True, help=help_text,
                            callback=lambda ctx, param, v: None if v is None else
                            tuple(item(x.strip()) for x in v.split(",") if x.strip()))
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        return click.option(f"--{name}", field.name, type=args[0], nargs=len(args), default=default,
                            show_default=True, help=help_text)
    click_type = click.Choice(field.metadata[CHOICES]) if CHOICES in field.metadata else _SCALARS.get(kind, str)
    return click.option(f"--{name}", field.name, type=click_type, default=None if required else default,
                        required=required, show_default=not required and default is not None, help=help_text)


def options_from(cls: type, *, only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                 defaults: Mapping[str, Any] | None = None) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per field of ``cls`` (those in ``only``, minus
    ``exclude``); the command receives each under its field name. ``defaults`` replace a field's
    default for this command (e.g. a required field given a default)."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    if only is not None:
        order = list(only)
        fields = sorted((f for f in fields if f.name in order), key=lambda f: order.index(f.name))
    fields = [f for f in fields if f.name not in set(exclude)]
    defaults = dict(defaults or {})

    def decorate(func: Callable) -> Callable:
        for f in reversed(fields):
            if f.name in defaults:
                default, required = defaults[f.name], False
            elif f.default is not dataclasses.MISSING:
                default, required = f.default, False
            elif f.default_factory is not dataclasses.MISSING:
                default, required = f.default_factory(), False
            else:  # a field without default is required, unless None is allowed
                default, required = None, not _unwrap_optional(hints[f.name])[1]
            func = _click_option(f, hints[f.name], default, required)(func)
        return func

    return decorate


def take(cls: type, values: dict[str, Any], **extra: Any) -> Any:
    """Build ``cls`` from the entries of ``values`` named like its fields (removed from
    ``values``), plus ``extra``; tuples from ``nargs`` options arrive as tuples already."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {name: values.pop(name) for name in list(values) if name in names}
    return cls(**{**kwargs, **extra})
