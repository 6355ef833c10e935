"""The commands around files on disk: download (everything the stages need, into the Hugging Face cache),
materialize and verify (stage folders). Parse options, call one function, print."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from popyou_cli.cli.common import (PRESETS, choice_option, console, device_option, dtype_option, pipeline_at,
                                   revision_option, user_errors)


@user_errors
def download_cmd(
    stages: Optional[str] = typer.Option(None, "--stages", show_default=False, help="Comma-separated, e.g. "
                                         "gen-data,caption. Default: all."),
    preset: str = choice_option("full", "--preset", choices=PRESETS, help="The preset whose models are fetched."),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", metavar="SPEC", show_default=False,
                                           help="Pipeline for sample and eval. Default: as sample's."),
    revision: Optional[str] = revision_option(),
    device: str = device_option(None, help="Where the stages will run: picks the weight files."),
    dtype: str = dtype_option("auto: fp16 on CUDA, fp32 on CPU.", panel=None),
    check: bool = typer.Option(True, "--check/--no-check", help="Then load each stage offline in a fresh "
                               "process."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list the files and sizes."),
):
    """Fetch every file the stages need into the Hugging Face cache.

    Weights, configs, processors, tokenizers and the original PopYOU model; then each stage is loaded offline in a
    fresh process. Example: popyou download --stages gen-data,caption"""
    from popyou_cli.download import download

    download(stages=[s.strip() for s in stages.split(",") if s.strip()] if stages else None, preset=preset,
             pipeline=pipeline_at(pipeline, revision), device=device, dtype=dtype, check=check, dry_run=dry_run,
             console=console)


@user_errors
def materialize_cmd(
    src: Path = typer.Argument(..., help="A stage folder (gen-data, caption, encode)."),
    out: Path = typer.Argument(..., help="New folder: one standalone save_to_disk copy."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset folder at OUT."),
):
    """Copy a stage folder and its parents into one standalone dataset.

    datasets.load_from_disk(OUT) then needs nothing else. Example: popyou materialize data/enc data/enc-full"""
    from popyou_cli.store import materialize

    path = materialize(src, out, overwrite=overwrite)
    console.print(f"materialize: wrote {path}", highlight=False, soft_wrap=True)


@user_errors
def verify_cmd(
    folder: Path = typer.Argument(..., help="A stage folder; its parent folders are checked too."),
    report_only: bool = typer.Option(False, "--report-only", help="Only report: leave damaged shards in place."),
):
    """Re-hash every shard of a stage folder and its parents.

    Reports damaged and missing shards and stale parents. Damaged shards are set aside (hidden), so that rerunning
    the command that made the folder remakes exactly them. Exit status 1 when anything is wrong.
    Example: popyou verify data/enc"""
    from popyou_cli.store.verify import summary, verify

    reports = verify(folder, set_aside=not report_only)
    for report in reports:
        for line in report.lines():
            console.print(line, highlight=False, soft_wrap=True)
    console.print(summary(reports), highlight=False, soft_wrap=True)
    if not all(r.ok for r in reports):
        raise typer.Exit(1)
