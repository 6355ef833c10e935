"""What every popyou command shares: the stderr console, the one-line handling of user errors, options whose values
come from a fixed set, and help text shown exactly as written. How the command line itself is read (one-line usage
errors, flags that take no value) is cli/parsing.py."""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Optional, Sequence

import typer
from rich.console import Console
from rich.text import Text

from popyou_cli.core.errors import PopyouError
from popyou_cli.core.presets import DTYPES, QUANTIZE_MODES, PRESET_NAMES as PRESETS  # noqa: F401 - no torch

console = Console(stderr=True)


def user_errors(fn):
    """Turns every failure into one red line on stderr and exit status 1, no traceback: a PopyouError's message,
    anything else (a full disk, a corrupt file...) as failures.describe words it. --debug / POPYOU_DEBUG=1 also
    print the traceback. Ctrl-C: one line, exit status 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from popyou_cli.core.failures import debug_enabled, describe

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise  # click's own exits
        except KeyboardInterrupt:
            console.print(Text.assemble(("interrupted", "bold red"), "; rerun the same command to continue"),
                          highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - the one error path of the command line
            if is_usage_error(e):
                raise  # a usage error (typer.BadParameter...): parsing.PopyouGroup prints it
            if debug_enabled():
                console.print_exception()
            print_error(str(e) if isinstance(e, PopyouError) else describe(e))
            raise typer.Exit(1) from None

    return wrapper


def loading(what: str) -> None:
    """`loading WHAT…` on a terminal, at once, before the seconds that importing torch and loading take (in a log
    file the progress lines say it; an error stays one line there)."""
    if console.is_terminal:
        console.print(f"loading {what}…", highlight=False, markup=False, soft_wrap=True)


def print_error(message: str) -> None:
    """The one form of every error: `error: MESSAGE` on one line of stderr, the message as written (no markup: square
    brackets would vanish; no emoji: ":end:" would become one), whitespace folded."""
    console.print(Text.assemble(("error:", "bold red"), " ", " ".join(str(message).split())), highlight=False,
                  soft_wrap=True)


def is_usage_error(e: BaseException) -> bool:
    """click's own errors (a bad option, a missing value...), from click or from the copy of it inside typer."""
    return any(c.__name__ == "ClickException" for c in type(e).__mro__)


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


# ------------------------------------------------------------------------------------------ fixed value sets
# PRESETS, DTYPES and QUANTIZE_MODES come from core/presets (no torch there); test_cli_usability checks that they
# agree with devices.DTYPE_CHOICES and models.fast.QUANTIZE_MODES.


def choice_option(default, *names: str, choices: Sequence[str], noun: Optional[str] = None, **kw):
    """An option taking one of `choices`: listed in --help (as its metavar) and completed by the shell. Any other
    value is refused while the options are parsed, before any work or heavy import, in one line naming the option
    (or `noun`) and the choices."""
    choices = tuple(choices)

    def check(ctx: typer.Context, value: Optional[str]) -> Optional[str]:
        if value is None or ctx.resilient_parsing:
            return value
        key = str(value).strip().lower()
        if key not in choices:
            raise PopyouError(f"unknown {noun or names[0]} '{value}': {names[0]} must be "
                              f"{', '.join(choices[:-1])} or {choices[-1]}")
        return key

    def complete(incomplete: str) -> list[str]:
        return [c for c in choices if c.startswith(incomplete.lower())]

    return typer.Option(default, *names, metavar="|".join(choices), callback=check, autocompletion=complete, **kw)


# ------------------------------------------------------------------------------------------ help panels
# The panels of sample, eval and demo --help, by purpose (the training commands have their own, cli/train.py).
P_MODEL, P_SAMPLING, P_OUTPUT, P_SPEED, P_PROGRESS = "Model", "Sampling", "Output", "Speed", "Progress"


# ------------------------------------------------------------------------------------------ progress
def progress_every_option(panel: Optional[str] = P_PROGRESS):
    return typer.Option(None, "--progress-every", metavar="SECONDS", rich_help_panel=panel, show_default=False,
                        help="Seconds between progress lines in a log file (0: every update). Default: "
                        "$POPYOU_PROGRESS_EVERY, else 30.")


def int_list(text: str | None, flag: str) -> list[int] | None:
    """Comma-separated integers of option `flag` (None stays None)."""
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise PopyouError(f"{flag} takes comma-separated integers (got '{text}')") from None


# ------------------------------------------------------------------------------------------ sampling speed
# Short help here; docs/cli.md says what each mode does and BENCHMARKS.md what it costs.
DEVICE_FORMS = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def check_device_name(ctx: typer.Context, value: str) -> str:
    """The form of a --device value, checked while parsing (whether that GPU exists is devices.py's question)."""
    if value is not None and not ctx.resilient_parsing and not DEVICE_FORMS.fullmatch(value.strip().lower()):
        raise PopyouError(f"unknown device '{value}' (use auto, cpu, cuda or cuda:N)")
    return value if value is None else value.strip().lower()


def device_option(panel: Optional[str] = P_SPEED, help: str = "auto (the first GPU, else the CPU), cpu, cuda or "
                  "cuda:N."):
    return typer.Option("auto", "--device", rich_help_panel=panel, callback=check_device_name, help=help)


def dtype_option(help: str, default: Optional[str] = "auto", panel: Optional[str] = P_SPEED, **kw):
    return choice_option(default, "--dtype", choices=DTYPES, noun="dtype", rich_help_panel=panel, help=help, **kw)


def quantize_option():
    """--quantize of sample, eval and demo."""
    return choice_option(None, "--quantize", choices=QUANTIZE_MODES, show_default=False, rich_help_panel=P_SPEED,
                         help="Faster, images change a little: int8 layers (CPU) or bf16 weights. Default: exact.")


def cfg_scales_option():
    """--cfg-scales of sample, eval and demo."""
    return typer.Option(None, "--cfg-scales", metavar="K", show_default=False, rich_help_panel=P_SPEED,
                        help="Guidance on the first K scales only (0: none). Default: all (exact).")


def fast_option():
    """--fast of sample and eval (off by default: exact mode)."""
    return typer.Option(False, "--fast", rich_help_panel=P_SPEED, help="The fastest mode within 90% of exact "
                        "mode's tokens, measured once per machine.")


def demo_fast_option():
    """--fast / --exact of the demo (on by default there)."""
    return typer.Option(None, "--fast/--no-fast", " /--exact", show_default=False, rich_help_panel=P_SPEED,
                        help="The fastest mode within 90% of exact's tokens. Default: on, unless --dtype or "
                        "--quantize names a mode.")


def pipeline_option(help: str):
    return typer.Option(None, "--pipeline", envvar="POPYOU_PIPELINE", metavar="SPEC", show_default=False,
                        rich_help_panel=P_MODEL, help=help)


def revision_option():
    return typer.Option(None, "--revision", show_default=False, rich_help_panel=P_MODEL,
                        help="Hub branch, tag or commit of --pipeline.")


def check_prompt_file(given: Optional[Path], command: str = "sample") -> Optional[Path]:
    """--prompt-file: a file, not a prompt; a prompt given there gets a one-line error that says where prompts go."""
    if given is not None and not given.is_file():
        if given.exists():
            raise PopyouError(f"--prompt-file {given}: not a file (give a text file with one prompt per line)")
        where = (f"pass it as an argument: popyou sample \"{given}\"" if command == "sample" else
                 "write it into a text file, one prompt per line")
        raise PopyouError(f"--prompt-file takes a text file with one prompt per line, and '{given}' is no file; to "
                          f"use it as a prompt, {where}")
    return given


def pipeline_at(pipeline: Optional[str], revision: Optional[str]) -> Optional[str]:
    """--pipeline with --revision folded in as SPEC@REVISION, so one parser (hub.parse_spec) reads both."""
    if revision is None:
        return pipeline
    from popyou_cli.infer.resolve import default_pipeline

    spec = pipeline or default_pipeline()
    if Path(spec).expanduser().exists():
        raise PopyouError(f"--revision is for a pipeline on the Hub; {spec} is a local path")
    return f"{spec.rpartition('@')[0] if '@' in spec.rpartition('/')[2] else spec}@{revision}"
