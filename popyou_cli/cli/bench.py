"""`popyou bench ...`: benchmark commands (the measuring code is in bench/; results go to BENCHMARKS.md). Model
size is `--arch full|tiny` on every benchmark (`--depth` picks VAR-d16/d20/... for full)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from popyou_cli.cli.common import choice_option, console, user_errors
from popyou_cli.cli.parsing import PopyouCommand, PopyouGroup
from popyou_cli.core.bounds import MAX_BATCH, MAX_BENCH_IMAGES, check_int
from popyou_cli.core.errors import PopyouError

bench_app = typer.Typer(help="Benchmarks (random weights, no downloads); results are meant for BENCHMARKS.md.",
                        no_args_is_help=True, cls=PopyouGroup)
_ARCH = ("full", "tiny")
_ARCH_AUTO = ("auto", "full", "tiny")
_DEPTH = typer.Option(16, "--depth", help="VAR depth with --arch full (16 = VAR-d16).")
_OUT = typer.Option(None, "--out", help="Also write the results as JSON here.")


@bench_app.command("sample", cls=PopyouCommand)
@user_errors
def bench_sample(
    arch: str = choice_option("full", "--arch", choices=_ARCH, help="full: VAR-d16 (or --depth) with the VQ-VAE "
                              "ch160; tiny: the golden-sized models (seconds)."),
    depth: int = _DEPTH,
    batch_sizes: str = typer.Option("1,4", "--batch-sizes", help="Comma-separated batch sizes."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per setting; the median is reported."),
    device: str = typer.Option("auto", "--device"),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = leave as is)."),
    cfg_scales: int = typer.Option(8, "--cfg-scales", help="K of the cfg-scales modes."),
    video_frames: int = typer.Option(10, "--video-frames", help="Frames of the beta video (0 = skip it)."),
    distances: bool = typer.Option(True, "--distances/--no-distances", help="Also measure each fast mode's "
                                   "agreement with exact mode."),
    out: Optional[Path] = _OUT,
):
    """Seconds per image of VAR sampling in every mode.

    The reference's pattern against exact mode and every fast mode, in one run (random weights, 256 px, cfg 1.5, top-k 900, top-p 0.96, decode included); the demo's beta video; each
    fast mode's distance from exact. About `--repeats` images are timed per setting (runs = repeats / batch)."""
    _check_counts(repeats=repeats)
    check_int("--depth", depth, 1, 64)
    sizes = _sizes(batch_sizes)
    from popyou_cli.bench.sampling import bench_sampling

    bench_sampling(depth=depth, batch_sizes=sizes, repeats=repeats, device=device, threads=threads,
                   tiny=arch == "tiny", out=out, console=console, cfg_scales=cfg_scales,
                   video_frames=video_frames, distances=distances)


@bench_app.command("startup", cls=PopyouCommand)
@user_errors
def bench_startup_cmd(
    runs: int = typer.Option(5, "--runs", help="Fresh processes per case; the median is reported."),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", show_default=False, help="A pipeline folder for "
                                            "the sample case. Default: a tiny one made here."),
    out: Optional[Path] = _OUT,
):
    """Seconds to start: --help, a mistyped option, a tiny sample.

    Whole `popyou` processes, each started fresh: --help, a mistyped option and a one-image 64 px sample of a
    tiny pipeline; the median seconds, the peak memory and which heavy libraries each imported."""
    check_int("--runs", runs, 1, 100)
    from popyou_cli.bench.startup import bench_startup

    bench_startup(runs=runs, pipeline=pipeline, out=out, console=console)


@bench_app.command("gen-data", cls=PopyouCommand)
@user_errors
def bench_gen_data_cmd(
    n: int = typer.Option(64, "--n", help="Images per timed run (tiny)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Batch size (tiny)."),
    size: int = typer.Option(64, "--image-size", help="Image size of the tiny stand-in."),
    workers: Optional[int] = typer.Option(None, "--workers", show_default=False, help="Encoding threads (0 = on "
                                          "the generating thread). Default: CPUs - 1, at most 8."),
    arch: str = choice_option("tiny", "--arch", choices=_ARCH_AUTO, help="tiny: the offline stand-in; full: "
                              "SDXL-Turbo's architecture, 512 px; auto: full on CUDA."),
    batch_sizes: str = typer.Option("1,4,16", "--batch-sizes", help="Comma-separated batch sizes (full)."),
    dtype: str = choice_option("auto", "--dtype", choices=("auto", "fp32", "bf16", "fp16"), noun="dtype",
                               help="auto: fp16 on CUDA, fp32 on CPU."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per mode; the median is reported."),
    device: str = typer.Option("cpu", "--device"),
    out: Optional[Path] = _OUT,
):
    """images/s of gen-data.

    tiny: generation alone, then with PNG encoding and shard writing; full: SDXL-Turbo at real size, images/s per
    batch size."""
    from popyou_cli.bench.data import bench_gen_data

    _check_counts(n=n, batch_size=batch_size, repeats=repeats)
    bench_gen_data(n=n, batch_size=batch_size, size=size, workers=workers, repeats=repeats, device=device,
                   out=out, console=console, arch=arch, batch_sizes=_sizes(batch_sizes), dtype=dtype)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise PopyouError(f"--batch-sizes must be comma-separated positive integers, got '{text}'")
    for b in sizes:
        check_int("--batch-sizes", b, 1, MAX_BATCH)
    return sizes


def _check_counts(*, n: int | None = None, batch_size: int | None = None, repeats: int | None = None) -> None:
    """The benchmarks' counts (bounds.py): a benchmark times a few images, it does not make a data set."""
    check_int("--n", n, 1, MAX_BENCH_IMAGES)
    check_int("--batch-size", batch_size, 1, MAX_BATCH)
    check_int("--repeats", repeats, 1, 1000)


@bench_app.command("all", cls=PopyouCommand)
@user_errors
def bench_all_cmd(
    arch: str = choice_option("full", "--arch", choices=_ARCH, help="full: the real architectures, random "
                              "weights; tiny: the stand-ins."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per mode; the median is reported."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Write each stage's results as STAGE.json "
                                           "here."),
):
    """Every stage's benchmark in one run.

    gen-data (batch 1/4/16 at 512 px), caption, encode, sample and train. On a GPU, `popyou bench all --arch full --device cuda` takes a few minutes: the source of BENCHMARKS.md's GPU
    rows."""
    from popyou_cli.bench.sampling import bench_sampling
    from popyou_cli.bench.training import bench_training
    from popyou_cli.bench.data import bench_caption, bench_encode, bench_gen_data
    from popyou_cli.core.devices import resolve_device

    full = arch == "full"
    out = (lambda name: out_dir / f"{name}.json") if out_dir else (lambda name: None)  # noqa: E731
    gpu = resolve_device(device).type == "cuda"
    n = 64 if gpu else 4  # a CPU run is a smoke run: a few images
    console.rule("gen-data")
    bench_gen_data(n=n, batch_size=4, size=64, workers=None, repeats=repeats, device=device, out=out("gen-data"),
                   console=console, arch=arch, batch_sizes=[1, 4, 16] if gpu else [1])
    console.rule("caption")
    bench_caption(n=n, batch_size=min(n, 32 if gpu else 2), workers=0 if not gpu else 4, repeats=repeats,
                  device=device, arch=arch, max_new_tokens=20 if gpu else 4, num_beams=1, out=out("caption"),
                  console=console)
    console.rule("encode")
    bench_encode(n=n, batch_size=min(n, 64 if gpu else 2), workers=0 if not gpu else 4, repeats=repeats,
                 device=device, arch=arch, flip=False, out=out("encode"), console=console)
    console.rule("sample")
    bench_sampling(depth=16, batch_sizes=[1, 4] if gpu else [1], repeats=repeats, device=device, threads=0,
                   tiny=not full, out=out("sample"), console=console,
                   video_frames=10 if gpu else 0, distances=gpu)  # the extras only where they are quick
    console.rule("train")
    bench_training(tiny=not full, depth=16, steps=20 if gpu else 2, warmup=3 if gpu else 1,
                   batch_size=8 if gpu else 1, device=device, threads=0, out=out("train"), console=console)


@bench_app.command("caption", cls=PopyouCommand)
@user_errors
def bench_caption_cmd(
    n: int = typer.Option(64, "--n", help="Images per timed run."),
    batch_size: int = typer.Option(8, "--batch-size"),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader workers. Default: min(4, CPUs)."),
    arch: str = choice_option("auto", "--arch", choices=_ARCH_AUTO, help="tiny: the offline stand-in, 64 px; "
                              "full: BLIP-2 OPT-2.7b's architecture, 512 px; auto: full on CUDA."),
    max_new_tokens: int = typer.Option(20, "--max-new-tokens", help="Tokens per caption, exactly (min = max)."),
    num_beams: int = typer.Option(1, "--num-beams"),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per mode; the median is reported."),
    device: str = typer.Option("auto", "--device"),
    out: Optional[Path] = _OUT,
):
    """images/s of caption.

    The loader alone, generate alone, both, and (tiny) the whole stage."""
    from popyou_cli.bench.data import bench_caption
    from popyou_cli.data.runner import default_workers

    _check_counts(n=n, batch_size=batch_size, repeats=repeats)

    bench_caption(n=n, batch_size=batch_size, workers=default_workers() if workers is None else workers,
                  repeats=repeats, device=device, arch=arch, max_new_tokens=max_new_tokens, num_beams=num_beams,
                  out=out, console=console)


@bench_app.command("encode", cls=PopyouCommand)
@user_errors
def bench_encode_cmd(
    n: int = typer.Option(64, "--n", help="Images per timed run."),
    batch_size: int = typer.Option(16, "--batch-size"),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader workers. Default: min(4, CPUs)."),
    arch: str = choice_option("auto", "--arch", choices=_ARCH_AUTO, help="tiny: the offline stand-ins, 64 px; "
                              "full: VAR's VQ-VAE + ViT-B-16-SigLIP, 512 px; auto: full on CUDA."),
    flip: bool = typer.Option(False, "--hflip", help="Also encode the mirrored crop."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per mode; the median is reported."),
    device: str = typer.Option("auto", "--device"),
    out: Optional[Path] = _OUT,
):
    """images/s of encode.

    The loader alone, the models alone, both, and (tiny) the whole stage."""
    from popyou_cli.bench.data import bench_encode
    from popyou_cli.data.runner import default_workers

    _check_counts(n=n, batch_size=batch_size, repeats=repeats)

    bench_encode(n=n, batch_size=batch_size, workers=default_workers() if workers is None else workers,
                 repeats=repeats, device=device, arch=arch, flip=flip, out=out, console=console)


@bench_app.command("train", cls=PopyouCommand)
@user_errors
def bench_train_cmd(
    arch: str = choice_option("auto", "--arch", choices=_ARCH_AUTO, help="full: VAR-d16 (or --depth) + the "
                              "full VQ-VAE; tiny: the tiny pair; auto: full on a GPU."),
    depth: int = _DEPTH,
    steps: int = typer.Option(20, "--steps", help="Timed optimizer steps per mode."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed steps first (kernels, allocator)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = leave as is)."),
    out: Optional[Path] = _OUT,
):
    """Training tokens/s: stored codes against re-encoding.

    Stored codes (popyou) against re-encoding the images through the VQ-VAE every step (the original recipe),
    through the same training loop."""
    from popyou_cli.bench.training import bench_training
    from popyou_cli.core.devices import resolve_device

    tiny = arch == "tiny" or (arch == "auto" and resolve_device(device).type != "cuda")
    if steps < 2 or warmup < 0 or batch_size < 1:
        raise PopyouError("--steps must be at least 2, --warmup >= 0, --batch-size >= 1")
    check_int("--steps", steps, 2, 100_000)
    check_int("--warmup", warmup, 0, 100_000)
    check_int("--depth", depth, 1, 64)
    _check_counts(batch_size=batch_size)
    bench_training(tiny=tiny, depth=depth, steps=steps, warmup=warmup, batch_size=batch_size, device=device,
                   threads=threads, out=out, console=console)


@bench_app.command("import", cls=PopyouCommand)
@user_errors
def bench_import_cmd(
    arch: str = choice_option("full", "--arch", choices=_ARCH, help="full: VAR-d16 (or --depth); tiny: tiny "
                              "sizes (seconds)."),
    depth: int = _DEPTH,
    work: Optional[Path] = typer.Option(None, "--work", show_default=False, help="Folder for the temporary "
                                        "files (about 4 GB at d16). Default: the system's temp folder."),
    out: Optional[Path] = _OUT,
    layout: str = choice_option("space", "--layout", choices=("space", "lightning"), help="space: the demo "
                                "Space's VARtext_v1.pth; lightning: a training checkpoint."),
):
    """Seconds and peak memory of `popyou import`.

    On a file in the original PopYOU layout with random weights (VAR
    with LoRA on every Linear, VQ-VAE ch160, SigLIP-B text tower, adapter; about 1.96 GB in float32 in the Space's
    layout), then one image sampled from the imported folder."""
    from popyou_cli.bench.importing import bench_import

    bench_import(depth=depth, tiny=arch == "tiny", work=work, out=out, console=console, layout=layout)
