"""What every popyou command shares: the stderr console, the one-line handling of user errors, options whose values
come from a fixed set, renamed options that still work for one release, and help text shown exactly as written."""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import typer
from rich.console import Console
from rich.text import Text

from popyou_cli.core.errors import PopyouError
from popyou_cli.core.presets import QUANTIZE_MODES  # the option's values, no torch: --help stays fast

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
            if type(e).__module__.split(".")[0] == "click":
                raise  # a usage error (typer.BadParameter...): click prints it with the usage line
            if debug_enabled():
                console.print_exception()
            message = str(e) if isinstance(e, PopyouError) else describe(e)
            # The message as written: no markup (square brackets would vanish), no emoji (":end:" would become one).
            console.print(Text.assemble(("error:", "bold red"), " ", " ".join(message.split())), highlight=False,
                          soft_wrap=True)
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


def choice_option(default, *names: str, choices: Sequence[str], aliases: Optional[dict] = None, **kw):
    """An option taking one of `choices`: listed in --help (as its metavar) and completed by the shell. `aliases`
    are other spellings also accepted (e.g. float16 for fp16), turned into the choice. Any other value goes on
    unchanged to the stage, whose check refuses it in one line naming the flag and the choices (a usage error
    here would print click's multi-line box instead)."""
    choices, aliases = tuple(choices), dict(aliases or {})

    def normalise(value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        key = str(value).strip().lower()
        key = aliases.get(key, key)
        return key if key in choices else value

    def complete(incomplete: str) -> list[str]:
        return [c for c in choices if c.startswith(incomplete.lower())]

    return typer.Option(default, *names, metavar="|".join(choices), callback=normalise, autocompletion=complete, **kw)


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


# ------------------------------------------------------------------------------------------ sampling speed
def quantize_option():
    """--quantize of sample, eval and demo."""
    return choice_option(None, "--quantize", choices=QUANTIZE_MODES, show_default=False,
                         help="Faster sampling that changes the images a little (BENCHMARKS.md measures the speed and "
                         "the distance): int8 = int8 transformer layers on a CPU (bf16 weights on a GPU), about 2x at "
                         "batch 1 on a 2-core CPU; bf16 = bf16 transformer weights. Default: exact mode (the same "
                         "tokens as the reference VAR).")


def cfg_scales_option():
    """--cfg-scales of sample, eval and demo."""
    return typer.Option(None, "--cfg-scales", metavar="K", show_default=False,
                        help="Classifier-free guidance on the first K scales only (of 10 for VAR-d16): the large "
                        "late scales then run one pass instead of two. 8 saves about a third of the transformer's "
                        "work; 0 = no guidance. Default: every scale (exact).")


def fast_option():
    """--fast of sample and eval (off by default: exact mode)."""
    return typer.Option(False, "--fast", help="Sample in the fastest mode for this device among those within 90% of "
                        "exact mode's tokens (exact, --quantize int8, --dtype bf16, or both; BENCHMARKS.md), picked by "
                        "a few seconds' measurement on the model's shapes the first time, then cached per machine. "
                        "The mode is recorded with the results. POPYOU_FAST_MODE=exact|int8|bf16|bf16+int8 forces "
                        "one; on a GPU it is bf16 with CUDA graphs. Default: exact mode.")


def demo_fast_option():
    """--fast / --exact of the demo (on by default there)."""
    return typer.Option(None, "--fast/--no-fast", " /--exact", show_default=False,
                        help="The fastest sampling mode for this device within 90% of exact mode's tokens, as "
                        "'popyou sample --fast' picks it (the page's header names it). Default: on, unless --dtype "
                        "or --quantize names a mode; --exact (or --no-fast) for exact mode.")


def revision_option():
    return typer.Option(None, "--revision", help="Hub branch, tag or commit of --pipeline (same as SPEC@REVISION; "
                        "default: the main branch).", show_default=False)


def pipeline_at(pipeline: Optional[str], revision: Optional[str]) -> Optional[str]:
    """--pipeline with --revision folded in as SPEC@REVISION, so one parser (hub.parse_spec) reads both."""
    if revision is None:
        return pipeline
    from pathlib import Path

    from popyou_cli.infer.resolve import default_pipeline

    spec = pipeline or default_pipeline()
    if Path(spec).expanduser().exists():
        raise PopyouError(f"--revision is for a pipeline on the Hub; {spec} is a local path")
    return f"{spec.rpartition('@')[0] if '@' in spec.rpartition('/')[2] else spec}@{revision}"
