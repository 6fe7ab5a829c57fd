"""How every stage's ``__main__`` turns errors into exit statuses.

A :class:`~loraship.errors.UserError` (bad input) prints ``error: ...`` on
stderr, one line per problem, and exits 2. Anything else is a failure of ours:
the traceback is printed and the exit status is 1.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

import click

from loraship.errors import UserError

F = TypeVar("F", bound=Callable[..., object])


def report_errors(func: F) -> F:
    """Decorate a click command so user errors exit 2 with a one-line message."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as err:
            for line in str(err).splitlines() or [type(err).__name__]:
                click.echo(f"error: {line}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
