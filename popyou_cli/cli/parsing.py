"""How popyou reads a command line, on top of Typer: every error is one line, a flag is shown and read as a flag.

- A usage error (an unknown option, a missing value, a bad number) is one line, `error: ...` and exit status 2,
  instead of click's boxed panel; a PopyouError raised while the options are parsed (a choice_option's check)
  is one line and exit status 1, as `user_errors` prints every other failure.
- A flag shows no `<bool>` type in --help, since it takes no value; and a true/false/yes/no/on/off/1/0 written
  right after a flag is refused (`--more-smooth true` used to make "true" a second prompt). Such a word after
  `--` is an argument as written.
"""
from __future__ import annotations

import sys

from typer.core import TyperCommand, TyperGroup

from popyou_cli.cli.common import is_usage_error, print_error
from popyou_cli.core.errors import PopyouError

BOOLEAN_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "1", "0"})


def _flags_shown_as_flags(params: list) -> list:
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # typer would show <bool>, which reads as "takes a value"
    return params


def _refuse_values_after_flags(command, args: list[str]) -> None:
    flags = {opt for p in command.params if getattr(p, "is_flag", False) for opt in (*p.opts, *p.secondary_opts)}
    for flag, word in zip(args, args[1:]):
        if flag == "--":
            return
        if flag in flags and word.lower() in BOOLEAN_WORDS:
            raise PopyouError(f"{flag} is a flag and takes no value: drop '{word}' (a prompt '{word}' goes before "
                              f"the options or after --)")


class PopyouCommand(TyperCommand):
    """A command whose flags are shown and read as flags (see the module docstring)."""

    def get_params(self, ctx):
        return _flags_shown_as_flags(super().get_params(ctx))

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        _refuse_values_after_flags(self, args)
        return super().parse_args(ctx, args)


class PopyouGroup(TyperGroup):
    """The `popyou` app (and `popyou bench`): one-line errors for everything its commands parse."""

    def get_params(self, ctx):
        return _flags_shown_as_flags(super().get_params(ctx))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        import typer

        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except PopyouError as e:
            print_error(str(e))
            sys.exit(1)
        except typer.Abort:
            print_error("aborted")
            sys.exit(1)
        except Exception as e:
            if not is_usage_error(e):
                raise
            if type(e).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                message = e.format_message()
                print_error(message[:1].lower() + message[1:] + _help_hint(e))
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


def _help_hint(e) -> str:
    ctx = getattr(e, "ctx", None)
    return f" (see {ctx.command_path} --help)" if ctx is not None else ""
