"""`popyou bench train`: training tokens/s through popyou's own loop. Random weights, no download."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from popyou_cli.bench.common import machine_info, sync_time
from popyou_cli.models.var import VAR, VARConfig
from popyou_cli.models.vqvae import VQVAE, VQVAEConfig


def bench_training(*, tiny: bool, depth: int, steps: int, warmup: int, batch_size: int, device: str, threads: int,
                   out: Path | None, console) -> dict:
    """Training tokens/s through popyou's own loop (training.train), in two modes on the same random images:
    'stored codes' (what finetune does: codes tokenised once, here before the timing) and 're-encode' (the
    original recipe: every step runs the VQ-VAE encoder on the images first). Random weights, no download."""
    import tempfile

    from popyou_cli.models.checkpoints import build_tiny_var, build_tiny_vqvae
    from popyou_cli.models.var import next_scale_loss
    from popyou_cli.train.conditioning import teacher_forcing
    from popyou_cli.core.devices import resolve_device
    from popyou_cli.core.presets import TrainPreset
    from popyou_cli.train.loop import make_accelerator, train

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
                  tokens_per_row=var.config.L, on_step=lambda s, loss: stamps.append(sync_time(dev)))
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
