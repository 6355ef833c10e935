"""Benchmarks of the data stages behind `popyou bench gen-data|caption|encode`: random weights, no download.
`--arch full` builds the real architectures from popyou's bundled configs (popyou_cli/third_party/arch.py) and runs them
through the stages' own code; `--arch tiny` the offline stand-ins, plus the whole stage end to end."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from popyou_cli.bench.common import machine_info, timed


def bench_gen_data(*, n: int, batch_size: int, size: int, workers: int | None, repeats: int, device: str,
                   out: Path | None, console, arch: str = "tiny", batch_sizes: list[int] | None = None,
                   dtype: str = "auto") -> list[dict]:
    """images/s of `gen-data`. tiny: in three parts: the pipeline alone, PNG encoding alone (one thread), and the
    whole stage (generation overlapped with encoding and shard writing); the whole stage close to the pipeline
    alone means encoding and the disk are hidden behind generation. full: SDXL-Turbo's architecture (random
    weights, as the real load makes it) through the stage's own generate(), 512 px, 1 step, per batch size."""
    import tempfile

    from popyou_cli.core.devices import resolve_device, resolve_dtype
    from popyou_cli.data.prompts import default_scheme, make_prompt
    from popyou_cli.data import gen_data as G

    dev = resolve_device(device)
    dtype = resolve_dtype(dtype, dev, "data")
    if _arch(arch, dev) == "full":
        return _bench_gen_data_full(batch_sizes or [1, 4, 16], repeats, dev, dtype, out, console)
    pipe = G.load_pipeline("tiny", device=dev, dtype=dtype, size=size)  # built once, outside the timings
    scheme = default_scheme()
    prompts = [make_prompt(scheme, 0, i)[0] for i in range(n)]
    seeds = [G.image_seed(0, i) for i in range(n)]

    def generate_all():
        return [G.generate(pipe, prompts[b:b + batch_size], seeds[b:b + batch_size], size=size, steps=1,
                           guidance=0.0).numpy() for b in range(0, n, batch_size)]

    pixels = [px for batch in generate_all() for px in batch]  # also the warm-up
    rows = []

    def report(mode: str, times: list[float]) -> None:
        med = statistics.median(times)
        rows.append({"mode": mode, "n": n, "batch": batch_size, "size": size, "median_s": round(med, 4),
                     "images_per_s": round(n / med, 1), "runs_s": [round(t, 4) for t in times]})
        console.print(f"{mode:<34} {n / med:8.1f} images/s  (median {med:.3f} s for {n} images)", soft_wrap=True)

    report("pipeline only", [timed(generate_all, dev) for _ in range(repeats)])
    report("PNG encoding only (1 thread)", [timed(lambda: [G.encode_image(px) for px in pixels], dev)
                                            for _ in range(repeats)])
    with tempfile.TemporaryDirectory(prefix="popyou-bench-") as tmp:
        times = []
        for k in range(repeats):
            res = G.gen_data(out=Path(tmp) / f"run{k}", n=n, preset="tiny", size=size, batch_size=batch_size,
                             shard_size=max(batch_size, n // 4), device=str(dev), workers=workers, progress=False)
            times.append(res.seconds)
        report(f"gen-data end to end ({res.world_size} process)", times)
    result = {"benchmark": "gen-data", "machine": machine_info(dev), "results": rows}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return rows




def _bench_gen_data_full(batch_sizes: list[int], repeats: int, dev: torch.device, dtype: torch.dtype,
                         out: Path | None, console) -> list[dict]:
    from popyou_cli.third_party.arch import full_text_to_image
    from popyou_cli.core.devices import dtype_name
    from popyou_cli.data.prompts import default_scheme, make_prompt
    from popyou_cli.data import gen_data as G

    size = 512
    t0 = time.perf_counter()
    pipe = full_text_to_image(dev, dtype)
    console.print(f"SDXL-Turbo architecture, random weights, {dtype_name(dtype)}: built in "
                  f"{time.perf_counter() - t0:.1f} s", soft_wrap=True)
    scheme = default_scheme()
    rows: list[dict] = []
    for bs in batch_sizes:
        prompts = [make_prompt(scheme, 0, i)[0] for i in range(bs)]
        seeds = [G.image_seed(0, i) for i in range(bs)]

        def run():
            return G.generate(pipe, prompts, seeds, size=size, steps=1, guidance=0.0)

        shape = tuple(run().shape)  # also the warm-up (kernels, allocator, the VAE upcast)
        _median_rate(f"SDXL-Turbo 512 px, 1 step, batch {bs}", bs, [timed(run, dev) for _ in range(repeats)],
                     rows, console, batch=bs, size=size, dtype=dtype_name(dtype), output=list(shape))
    _peak(dev, rows, console)
    return _save({"benchmark": "gen-data", "arch": "full", "machine": machine_info(dev), "results": rows}, out)


# ------------------------------------------------------------------------------------------ caption / encode
def _bench_dataset(folder: Path, n: int, size: int) -> Path:
    """A save_to_disk dataset of n PNGs (size x size: smooth colour ramps plus mild noise, so that decoding costs
    what a generated picture costs) with prompt and caption columns."""
    import datasets
    import numpy as np

    from popyou_cli.data.gen_data import encode_image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    rows = []
    for i in range(n):
        base = rng.random(3, dtype=np.float32)[None, None] * 255 * (ramp[:, None, None] * 0.5 + 0.5)
        px = np.clip(base + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
        rows.append({"bytes": encode_image(px), "path": None})
    feats = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string"),
                               "caption": datasets.Value("string")})
    prompt = "A Funko Pop! figure inspired by a pirate captain, with tan skin, wearing a hat. Set on a white background."
    ds = datasets.Dataset.from_dict({"image": rows, "prompt": [prompt] * n, "caption": ["a toy pirate figure"] * n},
                                    features=feats)
    datasets.disable_progress_bars()  # its "Saving the dataset" bar would interleave with the results
    try:
        ds.save_to_disk(str(folder))
    finally:
        datasets.enable_progress_bars()
    return folder


def _median_rate(label: str, n: int, times: list[float], rows: list[dict], console, **extra) -> None:
    med = statistics.median(times)
    rate = float(f"{n / med:.3g}")  # 3 significant digits: real sizes on a CPU run well under 1 image/s
    rows.append({"mode": label, "n": n, "median_s": round(med, 4), "images_per_s": rate,
                 "runs_s": [round(t, 4) for t in times], **extra})
    console.print(f"{label:<44} {rate:9g} images/s  (median {med:.3f} s for {n} images)", soft_wrap=True)


def _save(result: dict, out: Path | None) -> list[dict]:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result["results"]


def _arch(arch: str, dev: torch.device) -> str:
    if arch == "auto":
        return "full" if dev.type == "cuda" else "tiny"
    if arch not in ("tiny", "full"):
        from popyou_cli.core.errors import PopyouError

        raise PopyouError(f"unknown --arch '{arch}' (use auto, tiny or full)")
    return arch


def bench_caption(*, n: int, batch_size: int, workers: int, repeats: int, device: str, arch: str,
                  max_new_tokens: int, num_beams: int, out: Path | None, console) -> list[dict]:
    """images/s of `caption`: the loader alone (decode + BLIP-2 preprocessing in worker processes), generate
    alone on a ready batch, both together; for the tiny arch also the whole stage (with shard writing). Every
    timed caption but the stage's has exactly max_new_tokens tokens (min = max), so runs and machines compare;
    the stage stops at the model's end-of-text as it does in real use."""
    import tempfile

    from popyou_cli.data.runner import loader, open_input, undecoded
    from popyou_cli.core.devices import resolve_device, resolve_dtype
    from popyou_cli.third_party import load_captioner
    from popyou_cli.data import caption as C

    dev = resolve_device(device)
    arch = _arch(arch, dev)
    dtype = resolve_dtype("auto", dev, "data")
    if arch == "full":
        from popyou_cli.third_party.arch import full_captioner

        net, processor = full_captioner(dev, dtype)
    else:
        net, processor = load_captioner("tiny", device=dev, dtype=dtype)
    gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, num_beams=num_beams, device=dev,
               dtype=dtype)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="popyou-bench-") as tmp:
        data = _bench_dataset(Path(tmp) / "in", n, 512 if arch == "full" else 64)
        ds = undecoded(open_input(data, Path(tmp) / "x", stage="caption", image_column="image")
                       .select_columns(["image"]), "image")
        batches = [list(range(b, min(b + batch_size, n))) for b in range(0, n, batch_size)]

        def make_loader():
            return loader(ds, C.Prepare("image"), C.Collate(processor, None), batches, workers,
                          pin_memory=dev.type == "cuda")

        ready = list(make_loader())  # also the warm-up of the decoders
        C.generate(net, processor, ready[0][3], **gen)  # warm-up: kernels, allocator
        _median_rate(f"loader only ({workers} workers)", n, [timed(lambda: list(make_loader()), dev)
                                                             for _ in range(repeats)], rows, console)
        _median_rate(f"generate only ({arch}, {str(dtype)[6:]}, beams {num_beams})", n,
                     [timed(lambda: [C.generate(net, processor, b[3], **gen) for b in ready], dev)
                      for _ in range(repeats)], rows, console)
        _median_rate("loader + generate", n, [timed(lambda: list(C.caption_batches(make_loader(), net, processor,
                                                                                     **gen)), dev)
                                              for _ in range(repeats)], rows, console)
        if arch == "tiny":
            times = [C.caption(dataset=data, out=Path(tmp) / f"run{k}", preset="tiny", batch_size=batch_size,
                               max_new_tokens=max_new_tokens, num_beams=num_beams, device=str(dev),
                               workers=workers, progress=False).seconds for k in range(repeats)]
            _median_rate("caption stage end to end (tiny, 1 process)", n, times, rows, console)
    _peak(dev, rows, console)
    return _save({"benchmark": "caption", "arch": arch, "batch": batch_size, "machine": machine_info(dev),
                  "results": rows}, out)


def bench_encode(*, n: int, batch_size: int, workers: int, repeats: int, device: str, arch: str, flip: bool,
                 out: Path | None, console) -> list[dict]:
    """images/s of `encode`: the loader alone (decode, Lanczos resize + crop, SigLIP preprocessing, tokenising
    in worker processes), the models alone (VQ-VAE fp32 + SigLIP image and two texts), both together; for the
    tiny arch also the whole stage. full = VAR's VQ-VAE (ch 160, 4096 codes, 256 px) and ViT-B-16-SigLIP."""
    import tempfile

    from popyou_cli.data.runner import loader, open_input, undecoded
    from popyou_cli.third_party import load_siglip
    from popyou_cli.core.devices import resolve_device, resolve_dtype
    from popyou_cli.core.images import default_resize
    from popyou_cli.models.checkpoints import build_tiny_vqvae
    from popyou_cli.data import encode as E

    dev = resolve_device(device)
    arch = _arch(arch, dev)
    dtype = resolve_dtype("auto", dev, "data")
    if arch == "full":
        from popyou_cli.third_party.arch import full_siglip, full_vqvae

        vae = full_vqvae(dev)
        siglip, preprocess, tokenizer = full_siglip(dev)
    else:
        vae = build_tiny_vqvae().to(dev)
        siglip, preprocess, tokenizer = load_siglip("tiny", device=dev)
    siglip.eval()
    size = vae.config.image_size
    texts = ["prompt", "caption"]
    enc = E.Encoder(vae, siglip, device=dev, dtype=dtype, flip=flip, text_columns=texts, embed_dtype="float16")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="popyou-bench-") as tmp:
        data = _bench_dataset(Path(tmp) / "in", n, 512 if arch == "full" else 64)
        ds = undecoded(open_input(data, Path(tmp) / "x", stage="encode", image_column="image")
                       .select_columns(["image", *texts]), "image")
        batches = [list(range(b, min(b + batch_size, n))) for b in range(0, n, batch_size)]

        def make_loader():
            return loader(ds, E.Prepare("image", texts, default_resize(size), size, preprocess), E.Collate(tokenizer),
                          batches, workers, pin_memory=dev.type == "cuda")

        ready = list(make_loader())
        enc(ready[0])  # warm-up
        _median_rate(f"loader only ({workers} workers)", n, [timed(lambda: list(make_loader()), dev)
                                                             for _ in range(repeats)], rows, console)
        what = f"models only ({arch}, VQ-VAE fp32, SigLIP {str(dtype)[6:]}{', flip' if flip else ''})"
        _median_rate(what, n, [timed(lambda: [enc(b) for b in ready], dev) for _ in range(repeats)], rows, console)
        _median_rate("loader + models", n, [timed(lambda: [enc(b) for b in make_loader()], dev)
                                            for _ in range(repeats)], rows, console)
        if arch == "tiny":
            times = [E.encode(dataset=data, out=Path(tmp) / f"run{k}", preset="tiny", batch_size=batch_size,
                              flip=flip, device=str(dev), workers=workers, progress=False).seconds
                     for k in range(repeats)]
            _median_rate("encode stage end to end (tiny, 1 process)", n, times, rows, console)
    _peak(dev, rows, console)
    return _save({"benchmark": "encode", "arch": arch, "batch": batch_size, "machine": machine_info(dev),
                  "results": rows}, out)


def _peak(dev: torch.device, rows: list[dict], console) -> None:
    """Peak GPU memory of the run (CUDA only: the CPU has no such counter), on the last row and printed."""
    if dev.type == "cuda" and rows:
        gb = torch.cuda.max_memory_allocated(dev) / 1e9
        rows[-1]["peak_gpu_gb"] = round(gb, 2)
        console.print(f"peak GPU memory {gb:.1f} GB")
