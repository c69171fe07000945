"""Fields of argument dataclasses that carry their help text: one source for the library's
defaults and the command-line flags generated from them (``cli/options.py``)."""

from __future__ import annotations

import dataclasses
from typing import Any

HELP = "help"  # metadata keys read by the CLI generator
FLAG = "flag"  # the flag's name when it is not the field's (e.g. spec.mode -> --projection)
CHOICES = "choices"


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           choices: tuple[str, ...] | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with ``help`` (and optionally its flag name and allowed values) in its metadata."""
    metadata = {HELP: help}
    if flag is not None:
        metadata[FLAG] = flag
    if choices is not None:
        metadata[CHOICES] = tuple(choices)
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
