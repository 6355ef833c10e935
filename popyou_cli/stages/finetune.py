"""`popyou finetune`: stage 1. VAR learns a new class (the Funko figures) from encode's stored codes.

The starting VAR (official, Hub, local or popyou) gets a new class-embedding row at id `num_classes`, and the null
(unconditional) row moves to the end, so the original classes keep working; the new row starts as a copy of a
chosen class, the mean of all classes, or random. Or an existing id is reused (the original reused ImageNet
578). The full model or a peft LoRA trains with VAR's teacher-forced next-scale loss and class dropout for CFG.
Output: OUT/model/ (config.json with class names + model.safetensors), which `popyou sample --class-id` loads,
beside the run folder's checkpoints/, samples/ and metrics.jsonl.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .. import runtime
from ..errors import PopyouError
from ..models.checkpoints import load_vqvae
from ..models.var import VAR, next_scale_loss
from ..pipeline import apply_lora, base_var, load_var_lora, save_var
from ..presets import FINETUNE_PRESETS, get_preset, resolve
from ..training import TrainConfig, load_encoded, make_accelerator, teacher_forcing, train


def token_weights(patch_nums, scale_weights: list[float] | None) -> torch.Tensor | None:
    """(1, L) per-token loss weights from one weight per scale, normalised to sum to 1 like VAR's uniform 1/L."""
    if not scale_weights:
        return None
    if len(scale_weights) != len(patch_nums) or min(scale_weights) < 0 or sum(scale_weights) <= 0:
        raise PopyouError(f"--scale-weights needs {len(patch_nums)} non-negative numbers (one per scale of "
                          f"{tuple(patch_nums)}), not all zero")
    w = torch.cat([torch.full((p * p,), float(s)) for p, s in zip(patch_nums, scale_weights)])
    return (w / w.sum()).view(1, -1)


def add_class(var: VAR, init: str | int, seed: int = 0) -> int:
    """Appends a class row before the null row; returns its id. init: a class id, 'mean' or 'random'."""
    n, C = var.num_classes, var.config.embed_dim
    old = var.class_emb.weight.data
    if isinstance(init, int):
        row = old[init].clone()
    elif init == "mean":
        row = old[:n].mean(0)
    else:  # the scale of VAR's own init (trunc normal, std sqrt(1/(3C))), from a fixed seed
        row = torch.nn.init.trunc_normal_(torch.empty(C), std=math.sqrt(1 / C / 3),
                                          generator=torch.Generator().manual_seed(seed)).to(old)
    emb = nn.Embedding(n + 2, C, device=old.device, dtype=old.dtype)
    emb.weight.data.copy_(torch.cat([old[:n], row[None], old[n:n + 1]]))  # null row stays last
    var.class_emb = emb
    var.num_classes = var.config.num_classes = n + 1
    return n


def parse_init(init_from: str, num_classes: int) -> str | int:
    if init_from in ("mean", "random"):
        return init_from
    try:
        cid = int(init_from)
    except ValueError:
        raise PopyouError(f"--init-from must be a class id, 'mean' or 'random' (got '{init_from}')") from None
    if not 0 <= cid < num_classes:
        raise PopyouError(f"--init-from {cid} is out of range: this VAR has classes 0..{num_classes - 1}")
    return cid


class VARTrainer(nn.Module):
    """VAR + the frozen quantizer that turns stored codes into VAR's teacher-forcing input."""

    def __init__(self, var: nn.Module, quantizer: nn.Module, class_id: int, hflip: bool):
        super().__init__()
        self.var, self.quantizer, self.class_id, self.hflip = var, quantizer, class_id, hflip
        self.patch_nums = base_var(var).config.patch_nums

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x, target = teacher_forcing(self.quantizer, batch, self.patch_nums, self.hflip, self.training)
        labels = torch.full((x.shape[0],), self.class_id, device=x.device)
        return self.var(labels, x), target


def finetune(*, data: Path, out: Path, preset: str = "full", var: str | None = None, vae: str | None = None,
             class_name: str = "funko pop", init_from: str = "mean", class_id: int | None = None,
             lora: bool = False, lora_save: str = "merged", scale_weights: list[float] | None = None,
             hflip: bool = True, overwrite: bool = False, console=None, on_step=None, **overrides) -> dict:
    """Runs stage 1; `overrides` are FinetunePreset / TrainConfig fields (None = preset). Returns a summary."""
    p = resolve(get_preset(FINETUNE_PRESETS, preset, stage="finetune"),
                **{k: v for k, v in overrides.items() if k not in ("epochs", "report_to", "resume", "seed")},
                var=var)
    if lora_save not in ("merged", "separate"):
        raise PopyouError(f"--lora-save must be merged or separate (got {lora_save})")
    cfg = TrainConfig.from_preset(p, overrides)
    if not 0 <= p.label_smoothing < 1 or not 0 <= p.cond_drop < 1:
        raise PopyouError("--label-smoothing and --cond-drop must be in [0, 1)")
    out = runtime.ensure_writable_dir(Path(out))
    acc = make_accelerator(cfg, out)

    # Everything that can be wrong with the input is checked here, before the first step.
    model, meta = load_var_lora(p.var)
    n0 = model.num_classes
    enc = load_encoded(Path(data), for_stage="finetune", columns=[], patch_nums=model.config.patch_nums,
                       console=console if acc.is_main_process else None)
    vae_spec = vae or enc["settings"].get("vqvae") or meta.get("vqvae")
    if not vae_spec:
        raise PopyouError(f"{data} does not name its VQ-VAE (no 'vqvae' in its manifest); pass --vae")
    vqvae = load_vqvae(vae_spec, patch_nums=model.config.patch_nums)
    if (vqvae.config.vocab_size, vqvae.config.z_channels) != (model.config.vocab_size, model.config.z_channels):
        raise PopyouError(f"the VQ-VAE {vae_spec} ({vqvae.config.vocab_size} codes x {vqvae.config.z_channels}) "
                          f"does not fit the VAR ({model.config.vocab_size} x {model.config.z_channels})")
    rows = enc["rows"]
    if int(rows["codes"].max()) >= model.config.vocab_size or int(rows["codes"].min()) < 0:
        raise PopyouError(f"{data}: codes outside 0..{model.config.vocab_size - 1}; were they made by {vae_spec}?")
    weights = token_weights(model.config.patch_nums, scale_weights)
    names = list(meta.get("class_names") or [None] * n0)
    if class_id is not None:
        if not 0 <= class_id < n0:
            raise PopyouError(f"--class-id {class_id} is out of range: this VAR has classes 0..{n0 - 1}")
        cid = class_id
    else:
        cid = add_class(model, parse_init(init_from, n0), seed=overrides.get("seed") or 0)
        names.append(None)
    names[cid] = class_name
    model.config.cond_drop_rate = p.cond_drop
    if lora:  # class_emb stays fully trainable: the new row has to move away from its initial value
        model = apply_lora(model, rank=p.lora_rank, alpha=p.lora_alpha, dropout=p.lora_dropout,
                           targets=p.lora_targets, train_modules=("class_emb",),
                           seed=cfg.seed)
    else:
        model.requires_grad_(True)
    model.train()
    wrapper = VARTrainer(model, vqvae.quantize, cid, hflip)

    def loss_fn(m, batch):
        logits, target = m(batch)
        return next_scale_loss(logits, target, p.label_smoothing, weights.to(logits.device) if weights is not None
                               else None)

    vqvae.to(acc.device)
    seeds = list(range(p.n_samples))

    def sample_fn(inner: VARTrainer, step: int) -> torch.Tensor:
        v = base_var(inner.var)
        imgs = [v.generate(vqvae, 1, cid, cfg=p.sample_cfg, top_k=min(p.sample_top_k, v.config.vocab_size),
                           top_p=p.sample_top_p, generator=runtime.generator(acc.device, s)) for s in seeds]
        return runtime.grid(runtime.to_uint8(torch.cat(imgs)))

    settings = {k: v for k, v in asdict(p).items()}
    cfg.extra = {"stage": "finetune", "data": str(data), "class_id": cid, "lora": lora, **settings}
    res = train(wrapper, rows, loss_fn, cfg, out, accelerator=acc, tokens_per_row=model_L(model),
                sample_fn=sample_fn if p.n_samples > 0 else None, console=console if acc.is_main_process else None,
                on_step=on_step, overwrite=overwrite, project="popyou-finetune")
    model_dir = out / "model"
    if acc.is_main_process:
        save_var(acc.unwrap_model(wrapper).var, model_dir, lora_save=lora_save, extra={
            "class_names": names, "new_class_id": cid, "vqvae": vae_spec, "base": p.var,
            "finetune": {"data": str(data), "steps": res.steps, "lora": lora, "init_from": init_from,
                         "preset": preset, "settings": settings}})
    acc.wait_for_everyone()
    return {"model": model_dir, "class_id": cid, "steps": res.steps, "losses": res.losses, "skipped": enc["skipped"],
            "rows": len(rows["codes"]), "tokens_per_s": res.tokens_per_s, "world_size": acc.num_processes,
            "is_main_process": acc.is_main_process, "checkpoint": res.last_checkpoint}


def model_L(model: nn.Module) -> int:
    return base_var(model).config.L
