"""Benchmarks behind `popyou bench`. They build models with random weights, so they need no download."""
from __future__ import annotations

import datetime
import json
import platform
import time
from pathlib import Path

import torch

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


def bench_sampling(**kw) -> list[dict]:
    """`popyou bench sample`: see bench_sample.py."""
    from .bench_sample import bench_sampling as run

    return run(**kw)


def bench_training(*, tiny: bool, depth: int, steps: int, warmup: int, batch_size: int, device: str, threads: int,
                   out: Path | None, console) -> dict:
    """Training tokens/s through popyou's own loop (training.train), in two modes on the same random images:
    'stored codes' (what finetune does: codes tokenised once, here before the timing) and 're-encode' (the
    original recipe: every step runs the VQ-VAE encoder on the images first). Random weights, no download."""
    import tempfile

    from .models.checkpoints import build_tiny_var, build_tiny_vqvae
    from .models.var import next_scale_loss
    from .conditioning import teacher_forcing
    from .devices import resolve_device
    from .presets import TrainPreset
    from .training import make_accelerator, train

    dev = resolve_device(device)
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
        cfg = TrainPreset(lr=1e-4, batch_size=batch_size, max_steps=warmup + steps, warmup=0.0,
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
