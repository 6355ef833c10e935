"""The `popyou` command line: parses options and calls one stage function. No logic of its own.

Heavy libraries are imported inside the commands so that `popyou --help` stays fast.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import PopyouError

app = typer.Typer(
    help="popyou: a text-to-image generator built on VAR (Visual AutoRegressive modeling), specialised by "
    "synthetic data. Stages hand each other datasets on disk: gen-data -> caption -> encode -> finetune -> "
    "train-adapter -> sample / eval. Every stage runs offline on tiny stand-ins with --preset tiny.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
bench_app = typer.Typer(help="Benchmarks; results are meant for BENCHMARKS.md.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)

DEFAULT_VAR = "FoundationVision/var/var_d16.pth"
DEFAULT_VAE = "FoundationVision/var/vae_ch160v4096z32.pth"


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


@app.command()
@user_errors
def sample(
    prompt: Optional[str] = typer.Argument(None, help="Text prompt (needs a pipeline from train-adapter; coming with the text adapter). Leave out for --class-id."),
    class_id: Optional[int] = typer.Option(None, "--class-id", help="Class-conditional sampling: the class row to use (ImageNet ids 0-999 for the official models)."),
    var: str = typer.Option(DEFAULT_VAR, "--var", help="VAR weights: local .pth/.safetensors, a popyou model folder, or a Hub file org/repo/file."),
    vae: str = typer.Option(DEFAULT_VAE, "--vae", help="VQ-VAE weights, same forms as --var."),
    n: int = typer.Option(4, "--n", help="Number of images."),
    batch_size: int = typer.Option(4, "--batch-size", help="Images generated together (CFG doubles the batch internally)."),
    cfg: float = typer.Option(1.5, "--cfg", help="Classifier-free guidance at the last scale; it ramps up linearly from 0 over the scales as in VAR."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the k most likely codes (0 = off, 1 = greedy). Default: 900, capped at the vocabulary size.", show_default=False),
    top_p: float = typer.Option(0.96, "--top-p", help="Nucleus sampling mass (0 = off)."),
    more_smooth: bool = typer.Option(False, "--more-smooth", help="Gumbel-softmax code mixing for smoother images (VAR's more_smooth)."),
    seed: int = typer.Option(0, "--seed", help="Batch b uses seed+b: same seed and batch size give the same images on the same device type."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16 (autocast)."),
    out: Path = typer.Option(Path("samples"), "--out", help="Folder for the PNGs and the grid."),
):
    """Generate images with VAR. Example: popyou sample --class-id 207 --n 8 --out dogs/"""
    from .stages.sample import SamplingOptions, sample_classes

    if prompt is not None:
        raise PopyouError("text prompts need a pipeline made by 'popyou train-adapter' (not available yet); "
                          "use --class-id N for class-conditional sampling")
    if class_id is None:
        raise PopyouError("give a prompt or --class-id N (e.g. --class-id 207 for the official ImageNet models)")
    res = sample_classes(var=var, vae=vae, class_id=class_id, n=n, batch_size=batch_size,
                         opts=SamplingOptions(cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth),
                         seed=seed, device=device, dtype=dtype, out=out)
    name = f" ({res['class_name']})" if res["class_name"] else ""
    console.print(f"wrote {len(res['images'])} images of class {class_id}{name} to {out}/ and the grid {res['grid']}")
    typer.echo(str(res["grid"]))


@bench_app.command("sample")
@user_errors
def bench_sample(
    depth: int = typer.Option(16, "--depth", help="VAR depth of the random-weight model (16 = VAR-d16)."),
    batch_sizes: str = typer.Option("1,4", "--batch-sizes", help="Comma-separated batch sizes."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per setting; the median is reported."),
    device: str = typer.Option("auto", "--device"),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = leave as is)."),
    tiny: bool = typer.Option(False, "--tiny", help="Use the tiny golden-sized architecture (seconds, for smoke tests)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the results as JSON here."),
):
    """Seconds per image of VAR sampling (random weights, 256 px, cfg 1.5, top-k 900, top-p 0.96)."""
    from .bench import bench_sampling

    bench_sampling(depth=depth, batch_sizes=[int(b) for b in batch_sizes.split(",")], repeats=repeats,
                   device=device, threads=threads, tiny=tiny, out=out, console=console)


def main() -> None:  # pragma: no cover - console-script shim
    sys.exit(app())
