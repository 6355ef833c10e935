"""What every benchmark shares: the machine it ran on, random-weight models (no download), a timer that waits
for the GPU."""
from __future__ import annotations

import datetime
import os
import platform
import time

import torch

from popyou_cli.core.devices import cpu_info
from popyou_cli.models.var import VAR, VARConfig
from popyou_cli.models.vqvae import VQVAE, VQVAEConfig


def machine_info(dev: torch.device) -> dict:
    info = {"date": datetime.date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu": cpu_info().model or platform.processor() or "unknown",
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(dev)}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


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


def timed(fn, dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t


def sync_time(dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()
