"""The installed `popyou` command (a real process), and help texts."""
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from popyou_cli.cli.app import app


def test_installed_command_lists_subcommands():
    exe = Path(sys.executable).parent / "popyou"
    assert exe.is_file(), "the console script is not installed next to the interpreter (pip install -e .)"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    for cmd in ("download", "gen-data", "caption", "encode", "finetune", "train-adapter", "import", "sample", "eval", "demo",
                "materialize", "bench"):
        assert cmd in res.stdout


def test_sample_help_teaches_the_options():
    res = CliRunner().invoke(app, ["sample", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for opt in ("--class-id", "--var", "--vae", "--cfg", "--top-k", "--top-p", "--more-smooth", "--seed", "--out"):
        assert opt in res.output


def test_version():
    from popyou_cli import __version__

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"popyou {__version__}"
