"""`popyou bench ...`: benchmark commands (the measuring code is in bench.py; results go to BENCHMARKS.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli_common import console, user_errors
from .errors import PopyouError

bench_app = typer.Typer(help="Benchmarks (random weights, no downloads); results are meant for BENCHMARKS.md.",
                        no_args_is_help=True)


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


@bench_app.command("gen-data")
@user_errors
def bench_gen_data_cmd(
    n: int = typer.Option(64, "--n", help="Images per timed run."),
    batch_size: int = typer.Option(8, "--batch-size"),
    size: int = typer.Option(64, "--size", help="Image size of the tiny stand-in."),
    workers: int = typer.Option(0, "--workers", help="Encoding threads (0 = CPU count - 1, at most 8)."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per mode; the median is reported."),
    device: str = typer.Option("cpu", "--device"),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the results as JSON here."),
):
    """images/s of gen-data on the tiny preset: generation alone, then with PNG encoding and shard writing."""
    from .bench import bench_gen_data

    bench_gen_data(n=n, batch_size=batch_size, size=size, workers=workers, repeats=repeats, device=device,
                   out=out, console=console)




@bench_app.command("caption")
@user_errors
def bench_caption_cmd(
    n: int = typer.Option(64, "--n", help="Images per timed run."),
    batch_size: int = typer.Option(8, "--batch-size"),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader workers Default: min(4, CPUs)."),
    arch: str = typer.Option("auto", "--arch", help="tiny (offline stand-in, 64 px) or full (BLIP-2 OPT-2.7b architecture, random weights, 512 px input) Default auto: full on CUDA, else tiny."),
    max_new_tokens: int = typer.Option(20, "--max-new-tokens", help="Tokens per caption, exactly (min = max)."),
    num_beams: int = typer.Option(1, "--num-beams"),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per mode; the median is reported."),
    device: str = typer.Option("auto", "--device"),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the results as JSON here."),
):
    """images/s of caption: loader alone, generate alone, both, and (tiny) the whole stage."""
    from .bench import bench_caption
    from .images import default_workers

    bench_caption(n=n, batch_size=batch_size, workers=default_workers() if workers is None else workers,
                  repeats=repeats, device=device, arch=arch, max_new_tokens=max_new_tokens, num_beams=num_beams,
                  out=out, console=console)


@bench_app.command("encode")
@user_errors
def bench_encode_cmd(
    n: int = typer.Option(64, "--n", help="Images per timed run."),
    batch_size: int = typer.Option(16, "--batch-size"),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader workers Default: min(4, CPUs)."),
    arch: str = typer.Option("auto", "--arch", help="tiny (offline stand-ins, 64 px) or full (VAR's VQ-VAE + ViT-B-16-SigLIP, random weights, 512 px input) Default auto: full on CUDA, else tiny."),
    flip: bool = typer.Option(False, "--flip", help="Also encode the flipped crop."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per mode; the median is reported."),
    device: str = typer.Option("auto", "--device"),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the results as JSON here."),
):
    """images/s of encode: loader alone, models alone, both, and (tiny) the whole stage."""
    from .bench import bench_encode
    from .images import default_workers

    bench_encode(n=n, batch_size=batch_size, workers=default_workers() if workers is None else workers,
                 repeats=repeats, device=device, arch=arch, flip=flip, out=out, console=console)


@bench_app.command("train")
@user_errors
def bench_train_cmd(
    tiny: Optional[bool] = typer.Option(None, "--tiny/--d16", help="tiny VAR + VQ-VAE, or VAR-d16 + the full VQ-VAE with random weights (default: d16 on a GPU, tiny on a CPU)."),
    depth: int = typer.Option(16, "--depth", help="VAR depth when not --tiny."),
    steps: int = typer.Option(20, "--steps", help="Timed optimizer steps per mode."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed steps first (kernels, allocator)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = leave as is)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the results as JSON here."),
):
    """Training tokens/s from stored codes (popyou) vs re-encoding the images through the VQ-VAE every step
    (the original recipe), through the same training loop."""
    from .bench import bench_training
    from .runtime import pick_device

    if tiny is None:
        tiny = pick_device(device).type != "cuda"
    if steps < 2 or warmup < 0 or batch_size < 1:
        raise PopyouError("--steps must be at least 2, --warmup >= 0, --batch-size >= 1")
    bench_training(tiny=tiny, depth=depth, steps=steps, warmup=warmup, batch_size=batch_size, device=device,
                   threads=threads, out=out, console=console)
