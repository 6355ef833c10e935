"""What every popyou command shares: the stderr console and the one-line handling of user errors."""
from __future__ import annotations

import functools

import typer
from rich.console import Console

from .errors import PopyouError

console = Console(stderr=True)


def user_errors(fn):
    """Turns a PopyouError into one red line on stderr and exit status 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PopyouError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper
