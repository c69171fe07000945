"""What both commands share: one-line errors with exit code 2."""

from __future__ import annotations

import functools
import sys
from typing import Callable

import click

from cropi.errors import CropiError
from sketchstore.errors import SketchStoreError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def one_line_errors(func: Callable) -> Callable:
    """Turn library errors into ``error: ...`` on stderr and exit code 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (SketchStoreError, CropiError) as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            click.echo("interrupted: committed parts are kept; re-run the same command to resume", err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper
