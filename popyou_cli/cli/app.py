"""The `popyou` command line: the Typer app and its commands, registered in pipeline order (that is the order
`popyou --help` lists them). Each command lives in its phase's module (cli/data.py, train.py, infer.py, eval.py,
store.py, bench.py) and imports its stage only after its options are checked, so that --help and a mistyped
option are answered before torch is imported.
"""
from __future__ import annotations

import sys

import typer

from popyou_cli.cli.bench import bench_app
from popyou_cli.cli.common import show_help_literally
from popyou_cli.cli.data import caption_cmd, encode_cmd, gen_data_cmd
from popyou_cli.cli.eval import eval_cmd
from popyou_cli.cli.infer import demo_cmd, import_cmd, sample_cmd
from popyou_cli.cli.parsing import PopyouCommand, PopyouGroup
from popyou_cli.cli.store import download_cmd, materialize_cmd, verify_cmd
from popyou_cli.cli.train import finetune_cmd, train_adapter_cmd

show_help_literally()  # help texts say "[preset: 3e-4]" and "START:END:N" and mean them as written
app = typer.Typer(
    help="popyou: a text-to-image generator built on VAR (Visual AutoRegressive modeling), specialised by "
    "synthetic data.\n\nStages hand each other datasets on disk: gen-data -> caption -> encode -> finetune -> "
    "train-adapter -> sample / eval. Every stage runs offline on tiny stand-ins with --preset tiny. Every option "
    "of every command: docs/cli.md.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=PopyouGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from popyou_cli.core.version import __version__

        typer.echo(f"popyou {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          debug: bool = typer.Option(False, "--debug", help="On an error, also print the traceback (as "
                                     "POPYOU_DEBUG=1 does). Give it before the command.")
          ) -> None:
    """popyou: a text-to-image generator built on VAR, specialised by synthetic data."""
    from popyou_cli.core import failures

    failures.debug_flag = debug  # set on every invocation: an in-process caller's next command starts without it
    failures.one_line_warnings()


for _name, _command in (("download", download_cmd), ("gen-data", gen_data_cmd), ("caption", caption_cmd),
                        ("encode", encode_cmd), ("finetune", finetune_cmd), ("train-adapter", train_adapter_cmd),
                        ("import", import_cmd), ("sample", sample_cmd), ("demo", demo_cmd), ("eval", eval_cmd),
                        ("materialize", materialize_cmd), ("verify", verify_cmd)):
    app.command(_name, cls=PopyouCommand)(_command)
app.add_typer(bench_app, name="bench")


def main() -> None:  # pragma: no cover - console-script shim
    sys.exit(app())
