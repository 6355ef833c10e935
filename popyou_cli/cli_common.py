"""What every popyou command shares: the stderr console, the one-line handling of user errors, options whose values
come from a fixed set, renamed options that still work for one release, and help text shown exactly as written."""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import typer
from rich.console import Console
from rich.text import Text

from .errors import PopyouError

console = Console(stderr=True)


def user_errors(fn):
    """Turns a PopyouError into one red line on stderr and exit status 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PopyouError as e:
            # The message as written: no markup (square brackets would vanish), no emoji (":end:" would become one).
            console.print(Text.assemble(("error:", "bold red"), " ", str(e)), highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _literal_help_text(*, text: str, style: str = "", markup_mode=None):
    """typer's help formatter without markup or emoji codes: popyou's help says "[preset: 3e-4]" and "START:END:N"
    and means them literally. The rich panels and colours stay."""
    import inspect

    from typer.rich_utils import highlighter

    return highlighter(Text(inspect.cleandoc(text), style=style))


def show_help_literally() -> None:
    """Installs _literal_help_text as typer's help formatter (typer renders every help string through it)."""
    import typer.rich_utils as rich_utils

    rich_utils._make_rich_text = _literal_help_text


def warn(message: str) -> None:
    console.print(Text.assemble(("warning:", "bold yellow"), " ", message), highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------ fixed value sets
PRESETS = ("full", "tiny")
DTYPES = ("auto", "fp32", "bf16", "fp16")
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def choice_option(default, *names: str, choices: Sequence[str], aliases: Optional[dict] = None, **kw):
    """An option taking one of `choices`: listed in --help (as its metavar), completed by the shell, checked on
    the command line. `aliases` are other spellings also accepted (e.g. float16 for fp16), turned into the choice."""
    choices, aliases = tuple(choices), dict(aliases or {})
    flag = next((n for n in names if n.startswith("--")), names[0])

    def check(value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        key = str(value).strip().lower()
        key = aliases.get(key, key)
        if key not in choices:
            raise typer.BadParameter(f"'{value}' is not one of {', '.join(choices)}", param_hint=flag)
        return key

    def complete(incomplete: str) -> list[str]:
        return [c for c in choices if c.startswith(incomplete.lower())]

    return typer.Option(default, *names, metavar="|".join(choices), callback=check, autocompletion=complete, **kw)


# ------------------------------------------------------------------------------------------ renamed options
def renamed(new, old, *, new_flag: str, old_flag: str, unset=None):
    """The value of an option that was renamed: `new`, or `old` (the old spelling, hidden; works for one release
    with a warning). Both given: a one-line error."""
    if old is None or old is False or old == unset:
        return new
    if new is not None and new is not False and new != unset:
        raise PopyouError(f"{old_flag} is the old name of {new_flag}; give {new_flag} only")
    warn(f"{old_flag} is deprecated and will be removed in the next release; use {new_flag}")
    return old


def hidden_alias(default, flag: str, new_flag: str):
    """The old spelling of an option, kept working but out of --help."""
    return typer.Option(default, flag, hidden=True, help=f"Deprecated: use {new_flag}.")


# ------------------------------------------------------------------------------------------ progress
def progress_every_option(panel: Optional[str] = None):
    return typer.Option(None, "--progress-every", metavar="SECONDS", rich_help_panel=panel, show_default=False,
                        help="Seconds between two progress lines when stderr is not a terminal (a log file); "
                        "0 = a line at every update. Default: $POPYOU_PROGRESS_EVERY, else 30. On a terminal: a "
                        "live bar.")


def int_list(text: str | None, flag: str) -> list[int] | None:
    """Comma-separated integers of option `flag` (None stays None)."""
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise PopyouError(f"{flag} takes comma-separated integers (got '{text}')") from None
