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
