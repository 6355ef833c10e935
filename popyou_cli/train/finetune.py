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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from popyou_cli.train.conditioning import ConditionedVAR, TrainingStageResult, load_encoded, load_matching_vqvae, sample_grid_fn
from popyou_cli.core.bounds import check_training
from popyou_cli.core.errors import PopyouError
from popyou_cli.core.files import ensure_writable_dir, portable_spec
from popyou_cli.core.hub import push_folder
from popyou_cli.train.model_card import write_model_card
from popyou_cli.models.lora import apply_lora, base_var, load_var_lora, save_var
from popyou_cli.models.var import VAR, next_scale_loss
from popyou_cli.core.presets import FINETUNE_PRESETS, train_preset
from popyou_cli.train.resume import data_fingerprint, fingerprint, lock_run
from popyou_cli.train.loop import make_accelerator, train


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


@dataclass
class FinetuneResult(TrainingStageResult):
    model: Path = Path()  # the model folder, OUT/model
    pushed: str | None = None  # the Hub commit URL with --push-to-hub

    def summary(self) -> str:
        loss = f"loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}, " if self.losses else ""
        pushed = f"; pushed: {self.pushed}" if self.pushed else ""
        return (f"{self._head('finetune')}{loss}{self.tokens_per_s:,.0f} tokens/s; class id {self.class_id}; "
                f"model in {self.model}{pushed}")


def finetune(*, data: Path, out: Path, preset: str = "full", vae: str | None = None, class_name: str = "funko pop",
             init_from: str = "mean", class_id: int | None = None, overwrite: bool = False, console=None,
             on_step=None, push: str | None = None, private: bool = False, **options) -> FinetuneResult:
    """Runs stage 1. `options` are TrainPreset fields (var, lora, lr, max_steps, ...; None = the preset's)."""
    p = train_preset(FINETUNE_PRESETS, preset, stage="finetune", **options)
    check_training(p)  # every number in its range (bounds.py), before the folder is made
    out = ensure_writable_dir(Path(out))
    acc = make_accelerator(p, out, dtype_from_preset=preset if options.get("mixed_precision") is None else None)
    lock = lock_run(acc, out, "popyou finetune")  # one run per folder: a second one is refused, naming this process

    # Everything that can be wrong with the input is checked here, before the first step.
    model, meta = load_var_lora(p.var)
    n0 = model.num_classes
    enc = load_encoded(Path(data), for_stage="finetune", columns=[], patch_nums=model.config.patch_nums,
                       console=console if acc.is_main_process else None)
    rows = enc["rows"]
    vqvae, vae_spec = load_matching_vqvae(vae, model, rows["codes"], data=data, settings=enc["settings"], meta=meta,
                                          var_spec=p.var)
    weights = token_weights(model.config.patch_nums, p.scale_weights)
    names = list(meta.get("class_names") or [None] * n0)
    if class_id is not None:
        if not 0 <= class_id < n0:
            raise PopyouError(f"--class-id {class_id} is out of range: this VAR has classes 0..{n0 - 1}")
        cid = class_id
    else:
        cid = add_class(model, parse_init(init_from, n0), seed=p.seed)
        names.append(None)
    names[cid] = class_name
    model.config.cond_drop_rate = p.cond_drop
    if p.lora:  # class_emb stays fully trainable: the new row has to move away from its initial value
        model = apply_lora(model, rank=p.lora_rank, alpha=p.lora_alpha, dropout=p.lora_dropout,
                           targets=p.lora_targets, train_modules=("class_emb",), seed=p.seed)
    else:
        model.requires_grad_(True)
    model.train()
    trainer = ConditionedVAR(model, vqvae.quantize, cid, hflip=p.hflip)

    def loss_fn(m, batch):
        logits, target = m(batch)
        return next_scale_loss(logits, target, p.label_smoothing,
                               weights.to(logits.device) if weights is not None else None)

    vqvae.to(acc.device)
    sample_fn = sample_grid_fn(vqvae, n=p.n_samples, cfg=p.sample_cfg, top_k=p.sample_top_k, top_p=p.sample_top_p,
                               device=acc.device) if p.n_samples > 0 else None
    model_dir, pushed = out / "model", None
    # Records hold no absolute local path (folders are moved and uploaded): local ones relative to the folder.
    settings = {**asdict(p), "var": portable_spec(p.var, model_dir), "resume": portable_spec(p.resume, model_dir)}
    run = {"stage": "finetune", "data": data_fingerprint(data), "var": fingerprint(p.var),
           "vae": fingerprint(vae_spec), "class_id": cid, "init_from": None if class_id is not None else init_from}
    res = train(trainer, rows, loss_fn, p, out, accelerator=acc, tokens_per_row=base_var(model).config.L,
                sample_fn=sample_fn, console=console if acc.is_main_process else None, on_step=on_step,
                overwrite=overwrite, project="popyou-finetune", run=run,
                tracker_config={"stage": "finetune", "data": portable_spec(data, out), "class_id": cid, **settings})
    if acc.is_main_process:
        save_var(acc.unwrap_model(trainer).var, model_dir, lora_save=p.lora_save, extra={
            "class_names": names, "new_class_id": cid, "vqvae": portable_spec(vae_spec, model_dir),
            "base": portable_spec(p.var, model_dir),
            "finetune": {"data": portable_spec(data, model_dir), "data_content": run["data"], "steps": res.steps,
                         "lora": p.lora, "init_from": init_from, "preset": preset, "settings": settings,
                         "resumed_from": portable_spec(res.resumed_from, model_dir), "history": res.history}})
        write_model_card(model_dir, "model", repo=push, facts={
            "stage": "finetune", "preset": preset, "steps": res.steps, "data": portable_spec(data, model_dir),
            "settings": settings, "losses": res.losses, "class_id": cid, "class_name": class_name,
            "var": portable_spec(p.var, model_dir)})
        if push:
            pushed = push_folder(model_dir, push, private=private, message="popyou finetune model")
    acc.wait_for_everyone()
    if lock is not None:
        lock.release()
    return FinetuneResult(steps=res.steps, losses=res.losses, rows=len(rows["codes"]), skipped=enc["skipped"],
                          tokens_per_s=res.tokens_per_s, world_size=acc.num_processes,
                          is_main_process=acc.is_main_process, class_id=cid, checkpoint=res.last_checkpoint,
                          model=model_dir, pushed=pushed)
