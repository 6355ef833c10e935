"""Benchmarks behind `popyou bench`. They build models with random weights, so they need no download."""
from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from . import runtime
from .models.var import VAR, VARConfig
from .models.vqvae import VQVAE, VQVAEConfig


def machine_info(dev: torch.device) -> dict:
    info = {"date": datetime.date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": __import__("os").cpu_count(),
            "threads": torch.get_num_threads(), "device": str(dev)}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def random_models(depth: int, tiny: bool, dev: torch.device) -> tuple[VAR, VQVAE]:
    torch.manual_seed(0)
    if tiny:
        var_cfg = VARConfig(depth=2, embed_dim=128, num_heads=2, num_classes=10, vocab_size=64, z_channels=8)
        vae_cfg = VQVAEConfig(vocab_size=64, z_channels=8, ch=32)
    else:
        var_cfg, vae_cfg = VARConfig.official(depth), VQVAEConfig()
    var = VAR(var_cfg)
    var.init_weights(init_adaln_gamma=1e-3)  # the training recipe's d16 setting, so attention actually matters
    return var.to(dev).eval(), VQVAE(vae_cfg).to(dev).eval()


def _timed(fn, dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t


def bench_sampling(*, depth: int, batch_sizes: list[int], repeats: int, device: str, threads: int, tiny: bool,
                   out: Path | None, console) -> list[dict]:
    dev = runtime.pick_device(device)
    if threads > 0:
        torch.set_num_threads(threads)
    var, vae = random_models(depth, tiny, dev)
    modes = {"fp32": torch.float32} if dev.type == "cpu" else {"fp16-autocast": torch.float16, "bf16-autocast": torch.bfloat16}
    rows = []
    for bs in batch_sizes:
        for mode, dtype in modes.items():
            def run(seed=0):
                with runtime.autocast(dev, dtype):
                    return var.generate(vae, bs, 1, cfg=1.5, top_k=900 if not tiny else 8, top_p=0.96,
                                        generator=runtime.generator(dev, seed))
            if dev.type == "cuda":
                run()  # warm-up: kernels, allocator
            times = [_timed(run, dev) for _ in range(repeats)]
            g1 = var.generate(vae, bs, 1, cfg=1.5, top_k=1, generator=runtime.generator(dev, 0)) if mode != "bf16-autocast" else None
            same = None
            if g1 is not None:
                g2 = var.generate(vae, bs, 1, cfg=1.5, top_k=1, generator=runtime.generator(dev, 0))
                same = bool(torch.equal(g1, g2))
            med = statistics.median(times)
            row = {"model": "tiny" if tiny else f"VAR-d{depth} + VQVAE ch160", "batch": bs, "mode": mode,
                   "median_s": round(med, 4), "s_per_image": round(med / bs, 4), "runs_s": [round(t, 4) for t in times],
                   "greedy_repeatable": same}
            rows.append(row)
            console.print(f"B={bs:<3} {mode:<14} median {med:8.3f} s  = {med / bs:7.3f} s/image  runs {row['runs_s']}")
    result = {"benchmark": "sample", "machine": machine_info(dev), "results": rows}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return rows


def bench_gen_data(*, n: int, batch_size: int, size: int, workers: int, repeats: int, device: str,
                   out: Path | None, console) -> list[dict]:
    """images/s of `gen-data` on the tiny preset, in three parts: the pipeline alone, PNG encoding alone (one
    thread), and the whole stage (generation overlapped with encoding and shard writing). The whole stage close
    to the pipeline alone means encoding and the disk are hidden behind generation."""
    import tempfile

    from .prompts import default_scheme, make_prompt
    from .stages import gen_data as G

    dev = runtime.pick_device(device)
    dtype = "fp16" if dev.type == "cuda" else "fp32"
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

    report("pipeline only", [_timed(generate_all, dev) for _ in range(repeats)])
    report("PNG encoding only (1 thread)", [_timed(lambda: [G.encode_image(px) for px in pixels], dev)
                                            for _ in range(repeats)])
    with tempfile.TemporaryDirectory(prefix="popyou-bench-") as tmp:
        times = []
        for k in range(repeats):
            res = G.gen_data(out=Path(tmp) / f"run{k}", n=n, preset="tiny", size=size, batch_size=batch_size,
                             shard_size=max(batch_size, n // 4), device=str(dev), workers=workers, progress=False)
            times.append(res["seconds"])
        report(f"gen-data end to end ({res['world_size']} process)", times)
    result = {"benchmark": "gen-data", "machine": machine_info(dev), "results": rows}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return rows


def bench_training(*, tiny: bool, depth: int, steps: int, warmup: int, batch_size: int, device: str, threads: int,
                   out: Path | None, console) -> dict:
    """Training tokens/s through popyou's own loop (training.train), in two modes on the same random images:
    'stored codes' (what finetune does: codes tokenised once, here before the timing) and 're-encode' (the
    original recipe: every step runs the VQ-VAE encoder on the images first). Random weights, no download."""
    import tempfile

    from .models.checkpoints import build_tiny_var, build_tiny_vqvae
    from .models.var import next_scale_loss
    from .training import TrainConfig, make_accelerator, teacher_forcing, train

    dev = runtime.pick_device(device)
    if threads > 0:
        torch.set_num_threads(threads)
    if tiny:
        var, vae = build_tiny_var(), build_tiny_vqvae()
    else:
        torch.manual_seed(0)
        var, vae = VAR(VARConfig.official(depth)), VQVAE(VQVAEConfig()).requires_grad_(False).eval()
        var.init_weights(init_adaln_gamma=1e-3)
    pns, size = var.config.patch_nums, vae.config.image_size
    n_rows = batch_size * 4
    images = torch.rand(n_rows, 3, size, size, generator=torch.Generator().manual_seed(0)).mul_(2).sub_(1)
    vae.to(dev)
    with torch.no_grad():
        codes = torch.cat([torch.cat(vae.encode_codes(images[i:i + batch_size].to(dev)), 1).cpu()
                           for i in range(0, n_rows, batch_size)]).to(torch.int16)
    precision = "bf16" if dev.type == "cuda" else "no"
    init_state = {k: v.clone() for k, v in var.state_dict().items()}

    class Step(torch.nn.Module):
        def __init__(self, reencode: bool):
            super().__init__()
            self.var, self.vae, self.reencode = var, vae, reencode

        def forward(self, batch):
            if self.reencode:  # the reference recipe: images -> VQ-VAE encoder -> codes, every step
                batch = {"codes": torch.cat(self.vae.encode_codes(batch["images"]), 1)}
            x, target = teacher_forcing(self.vae.quantize, batch, pns, hflip=False, training=True)
            return next_scale_loss(self.var(torch.zeros(len(x), dtype=torch.long, device=x.device), x), target)

    rows, times = [], {}
    for mode, reencode, data in (("stored codes", False, {"codes": codes}), ("re-encode", True, {"images": images})):
        var.load_state_dict(init_state)  # both modes start from the same weights
        stamps = []
        cfg = TrainConfig(lr=1e-4, batch_size=batch_size, max_steps=warmup + steps, warmup=0.0,
                          mixed_precision=precision, log_every=10**9, save_every=-1)
        with tempfile.TemporaryDirectory(prefix="popyou-bench-train-") as tmp:
            acc = make_accelerator(cfg, Path(tmp))
            train(Step(reencode).train(), data, lambda m, b: m(b), cfg, Path(tmp), accelerator=acc,
                  tokens_per_row=var.config.L, on_step=lambda s, loss: stamps.append(_sync_time(dev)))
        sec = stamps[-1] - stamps[warmup - 1] if warmup > 0 else stamps[-1] - stamps[0]
        n_steps = steps if warmup > 0 else steps - 1
        tps = n_steps * batch_size * var.config.L / sec
        times[mode] = tps
        rows.append({"mode": mode, "tokens_per_s": round(tps, 1), "steps_per_s": round(n_steps / sec, 3),
                     "batch": batch_size, "tokens_per_row": var.config.L, "precision": precision})
        console.print(f"{mode:<14} {tps:12,.0f} tokens/s  {n_steps / sec:8.2f} steps/s  (batch {batch_size})")
    speedup = times["stored codes"] / times["re-encode"]
    console.print(f"stored codes vs re-encoding every step: {speedup:.2f}x")
    result = {"benchmark": "train", "model": "tiny" if tiny else f"VAR-d{depth} + VQVAE ch160 (random weights)",
              "machine": machine_info(dev), "results": rows, "speedup": round(speedup, 2)}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result


def _sync_time(dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


# ------------------------------------------------------------------------------------------ caption / encode
def _bench_dataset(folder: Path, n: int, size: int) -> Path:
    """A save_to_disk dataset of n PNGs (size x size: smooth colour ramps plus mild noise, so that decoding costs
    what a generated picture costs) with prompt and caption columns."""
    import datasets
    import numpy as np

    from .stages.gen_data import encode_image

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
    rows.append({"mode": label, "n": n, "median_s": round(med, 4), "images_per_s": round(n / med, 1),
                 "runs_s": [round(t, 4) for t in times], **extra})
    console.print(f"{label:<44} {n / med:9.1f} images/s  (median {med:.3f} s for {n} images)", soft_wrap=True)


def _save(result: dict, out: Path | None) -> list[dict]:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result["results"]


def _arch(arch: str, dev: torch.device) -> str:
    if arch == "auto":
        return "full" if dev.type == "cuda" else "tiny"
    if arch not in ("tiny", "full"):
        from .errors import PopyouError

        raise PopyouError(f"unknown --arch '{arch}' (use auto, tiny or full)")
    return arch


def full_blip2(dev: torch.device, dtype: torch.dtype):
    """BLIP-2 OPT-2.7b's architecture (3.7B parameters) with random weights, built on `dev` (no download),
    and a processor of its image size with the tiny byte-level tokenizer (ids only feed the timing)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    from .encoders import build_tiny_captioner

    _, tiny = build_tiny_captioner()
    tok = tiny.tokenizer
    processor = Blip2Processor(BlipImageProcessor(size={"height": 224, "width": 224}), tok, num_query_tokens=32)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                           image_size=224, patch_size=14),
        qformer_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            encoder_hidden_size=1408, cross_attention_frequency=2),
        text_config=dict(model_type="opt", vocab_size=50272, hidden_size=2560, word_embed_proj_dim=2560,
                         ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        num_query_tokens=32, image_token_index=tok.convert_tokens_to_ids(str(processor.image_token)))
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in the run dtype: no fp32 copy of 3.7B weights
    try:
        with torch.device(dev), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = Blip2ForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    return net.eval(), processor


def bench_caption(*, n: int, batch_size: int, workers: int, repeats: int, device: str, arch: str,
                  max_new_tokens: int, num_beams: int, out: Path | None, console) -> list[dict]:
    """images/s of `caption`: the loader alone (decode + BLIP-2 preprocessing in worker processes), generate
    alone on a ready batch, both together; for the tiny arch also the whole stage (with shard writing). Every
    timed caption but the stage's has exactly max_new_tokens tokens (min = max), so runs and machines compare;
    the stage stops at the model's end-of-text as it does in real use."""
    import tempfile

    from .encoders import load_captioner
    from .images import loader, open_input, undecoded
    from .stages import caption as C

    dev = runtime.pick_device(device)
    arch = _arch(arch, dev)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if arch == "full":
        net, processor = full_blip2(dev, dtype)
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
        _median_rate(f"loader only ({workers} workers)", n, [_timed(lambda: list(make_loader()), dev)
                                                             for _ in range(repeats)], rows, console)
        _median_rate(f"generate only ({arch}, {str(dtype)[6:]}, beams {num_beams})", n,
                     [_timed(lambda: [C.generate(net, processor, b[3], **gen) for b in ready], dev)
                      for _ in range(repeats)], rows, console)
        _median_rate("loader + generate", n, [_timed(lambda: list(C.caption_batches(make_loader(), net, processor,
                                                                                     **gen)), dev)
                                              for _ in range(repeats)], rows, console)
        if arch == "tiny":
            times = [C.caption(dataset=data, out=Path(tmp) / f"run{k}", preset="tiny", batch_size=batch_size,
                               max_new_tokens=max_new_tokens, num_beams=num_beams, device=str(dev),
                               workers=workers, progress=False)["seconds"] for k in range(repeats)]
            _median_rate("caption stage end to end (tiny, 1 process)", n, times, rows, console)
    return _save({"benchmark": "caption", "arch": arch, "batch": batch_size, "machine": machine_info(dev),
                  "results": rows}, out)


def bench_encode(*, n: int, batch_size: int, workers: int, repeats: int, device: str, arch: str, flip: bool,
                 out: Path | None, console) -> list[dict]:
    """images/s of `encode`: the loader alone (decode, Lanczos resize + crop, SigLIP preprocessing, tokenising
    in worker processes), the models alone (VQ-VAE fp32 + SigLIP image and two texts), both together; for the
    tiny arch also the whole stage. full = VAR's VQ-VAE (ch 160, 4096 codes, 256 px) and ViT-B-16-SigLIP."""
    import tempfile

    import open_clip

    from .encoders import load_siglip
    from .images import loader, open_input, undecoded
    from .models.checkpoints import build_tiny_vqvae
    from .stages import encode as E

    dev = runtime.pick_device(device)
    arch = _arch(arch, dev)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if arch == "full":
        torch.manual_seed(0)
        vae = VQVAE(VQVAEConfig()).to(dev).eval()
        import logging

        quiet = logging.Filter()
        quiet.filter = lambda record: "No pretrained weights" not in record.getMessage()  # random on purpose
        logging.root.addFilter(quiet)
        try:
            siglip, _, preprocess = open_clip.create_model_and_transforms(
                "ViT-B-16-SigLIP", pretrained=None, device=dev, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
        finally:
            logging.root.removeFilter(quiet)
        vocab, ctx = siglip.vocab_size, siglip.context_length

        def tokenizer(texts):  # SigLIP's real tokenizer is a download; random ids cost the model the same
            return torch.randint(0, vocab, (len(texts), ctx))
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
            return loader(ds, E.Prepare("image", texts, size * 9 // 8, size, preprocess), E.Collate(tokenizer),
                          batches, workers, pin_memory=dev.type == "cuda")

        ready = list(make_loader())
        enc(ready[0])  # warm-up
        _median_rate(f"loader only ({workers} workers)", n, [_timed(lambda: list(make_loader()), dev)
                                                             for _ in range(repeats)], rows, console)
        what = f"models only ({arch}, VQ-VAE fp32, SigLIP {str(dtype)[6:]}{', flip' if flip else ''})"
        _median_rate(what, n, [_timed(lambda: [enc(b) for b in ready], dev) for _ in range(repeats)], rows, console)
        _median_rate("loader + models", n, [_timed(lambda: [enc(b) for b in make_loader()], dev)
                                            for _ in range(repeats)], rows, console)
        if arch == "tiny":
            times = [E.encode(dataset=data, out=Path(tmp) / f"run{k}", preset="tiny", batch_size=batch_size,
                              flip=flip, device=str(dev), workers=workers, progress=False)["seconds"]
                     for k in range(repeats)]
            _median_rate("encode stage end to end (tiny, 1 process)", n, times, rows, console)
    return _save({"benchmark": "encode", "arch": arch, "batch": batch_size, "machine": machine_info(dev),
                  "results": rows}, out)
