"""What both commands share: one-line errors with exit code 2."""

from __future__ import annotations

import functools
import sys
from typing import Callable

import click

from sketchstore.errors import UserError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def one_line_errors(func: Callable) -> Callable:
    """Turn library errors (sketchstore's, and those of plugins such as cropi) into ``error: ...`` on
    stderr and exit code 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            click.echo("interrupted: committed parts are kept; re-run the same command to resume", err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper
