"""Value checks for cropi's argument dataclasses: each failure is a one-line BadConfigError naming the field."""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

from .errors import BadConfigError

DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise BadConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_float(name: str, value: Any, minimum: float | None = None, strict: bool = False,
                maximum: float | None = None) -> float:
    """``value`` as a finite float >= ``minimum`` (> when ``strict``) and <= ``maximum``."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise BadConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise BadConfigError(f"{name} must be finite, got {value!r}")
    if minimum is not None and (out < minimum or (strict and out == minimum)):
        raise BadConfigError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")
    if maximum is not None and out > maximum:
        raise BadConfigError(f"{name} must be <= {maximum}, got {value!r}")
    return out


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise BadConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def check_device(value: Any) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (e.g. ``cuda:$LOCAL_RANK`` under torchrun)."""
    if not isinstance(value, str) or not DEVICE_PATTERN.match(value):
        raise BadConfigError(f"device must be cpu, cuda or cuda:N, got {value!r}")
    return value
