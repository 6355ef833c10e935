"""`popyou train-adapter`: stages 2 and 3. A SigLIP embedding steers VAR through the adapter.

cond = alpha * class_emb[class_id] + beta * adapter(embedding); conditioning dropout (VAR's, in training mode)
replaces the class by the null row and zeroes delta together, so CFG has an unconditional branch. The VAR is
frozen (its stochastic depth off), optionally with a peft LoRA on top; the adapter always trains.
`--stage image` reads `siglip_image`; `--stage text` reads `siglip_text_prompt` (or `_caption`) and usually
starts from the image-stage pipeline (`--init`), whose VAR it then reuses. At the end the held-out loss is
measured with the right, shuffled and no embedding: the adapter is useful when right < shuffled.
Output: OUT/pipeline/ (see infer/folder.py) beside the run folder's checkpoints/, samples/, metrics.jsonl, eval.json.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from popyou_cli.train.conditioning import (ConditionedVAR, TrainingStageResult, conditioning_eval, load_encoded,
                            load_matching_vqvae, sample_grid_fn, split_rows)
from popyou_cli.core.bounds import check_training
from popyou_cli.core.errors import PopyouError
from popyou_cli.core.files import atomic_write_json, ensure_writable_dir, portable_spec
from popyou_cli.train.model_card import write_model_card
from popyou_cli.models.adapter import AdapterConfig, CondAdapter, load_adapter
from popyou_cli.models.lora import apply_lora, base_var, load_var_lora
from popyou_cli.models.var import next_scale_loss
from popyou_cli.infer.folder import PipelineFolder
from popyou_cli.core.presets import ADAPTER_PRESETS, train_preset
from popyou_cli.train.resume import data_fingerprint, fingerprint, lock_run
from popyou_cli.train.loop import make_accelerator, train


@dataclass
class AdapterResult(TrainingStageResult):
    pipeline: Path = Path()  # the pipeline folder, OUT/pipeline
    eval: dict | None = None  # held-out loss: right, shuffled, class_only, rows (None without held-out rows)
    pushed: str | None = None  # the Hub commit URL with --push-to-hub

    def summary(self) -> str:
        ev = self.eval
        held = (f"; held-out loss {ev['right']:.4f} (shuffled embeddings {ev['shuffled']:.4f}, class only "
                f"{ev['class_only']:.4f})") if ev else ""
        pushed = f"; pushed: {self.pushed}" if self.pushed else ""
        return (f"{self._head('train-adapter')}{self.tokens_per_s:,.0f} tokens/s{held}; pipeline in "
                f"{self.pipeline}{pushed}")


def _init_from(init: str | None, var: str | None) -> tuple[CondAdapter | None, dict, str | None]:
    """(adapter to start from, its pipeline.json or {}, the VAR: --var, else the --init pipeline's)."""
    if init is None:
        return None, {}, var
    init_dir = Path(init)
    if not PipelineFolder.is_pipeline(init_dir) and PipelineFolder.is_pipeline(init_dir / "pipeline"):
        raise PopyouError(f"--init {init} is a train-adapter run folder; its pipeline is {init_dir / 'pipeline'}")
    adapter, _ = load_adapter(init_dir)
    if not PipelineFolder.is_pipeline(init_dir):  # an adapter folder alone
        return adapter, {}, var
    folder = PipelineFolder.read(init_dir, init)
    if var is None:  # the text stage continues on the image stage's VAR (its LoRA merged in)
        var = folder.part("var")
    return adapter, folder.config, var


def _encoder_entry(settings: dict, column_width: int, stage: str, text_field: str, init_cfg: dict, data) -> dict:
    """pipeline.json's `encoder` entry: the SigLIP the embeddings of `data` came from. Refused when the manifest
    and the column disagree, or when --init's adapter learnt another embedding space."""
    D = column_width
    if settings.get("siglip_dim") not in (None, D):
        raise PopyouError(f"{data}: manifest says siglip_dim {settings['siglip_dim']}, the column has width {D}")
    encoder = {"model": settings.get("siglip_model"), "pretrained": settings.get("siglip_pretrained"),
               "embedding": stage, "text_field": text_field if stage == "text" else None, "dim": D}
    old_enc = init_cfg.get("encoder", {})
    same_space = (old_enc.get("model"), old_enc.get("pretrained")) == (encoder["model"], encoder["pretrained"])
    if old_enc.get("model") and not same_space:
        raise PopyouError(f"--init was trained on {old_enc['model']}/{old_enc.get('pretrained')} embeddings, {data} "
                          f"holds {encoder['model']}/{encoder['pretrained']}: different embedding spaces")
    return encoder


def _adapter_for(adapter: CondAdapter | None, D: int, C: int, p, *, data, column: str, init) -> CondAdapter:
    """--init's adapter, checked to map the embedding width D to the VAR width C; else a new one drawn from --seed
    (not from whatever the global RNG holds: the same command, the same run)."""
    if adapter is not None:
        if (adapter.config.embed_dim, adapter.config.var_dim) != (D, C):
            raise PopyouError(f"the embedding width {D} of {data} ({column}) and the VAR width {C} do not fit the "
                              f"adapter from {init} ({adapter.config.embed_dim} -> {adapter.config.var_dim})")
        return adapter
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        return CondAdapter(AdapterConfig(D, C, p.hidden_dim or None), init_gain=p.adapter_init_gain)


def _class_id(class_id: int | None, meta: dict, init_cfg: dict, var: str, num_classes: int) -> int:
    """--class-id, else the class finetune made (the VAR's config), else the --init pipeline's."""
    cid = class_id if class_id is not None else meta.get("new_class_id", init_cfg.get("sampling", {}).get("class_id"))
    if cid is None:
        raise PopyouError(f"{var} names no class made by finetune; pass --class-id")
    if not 0 <= cid < num_classes:
        raise PopyouError(f"--class-id {cid} is out of range: this VAR has classes 0..{num_classes - 1}")
    return cid


def _frozen_var_trainer(model, vqvae, cid: int, adapter: CondAdapter, column: str, stage: str, p) -> ConditionedVAR:
    """The frozen VAR (no stochastic depth: nothing in it trains), optionally with a LoRA, and the trainable
    adapter, as one module."""
    model.requires_grad_(False)
    for b in model.blocks:
        b.drop_path = 0.0
    model.config.cond_drop_rate = p.cond_drop
    if p.lora:
        model = apply_lora(model, rank=p.lora_rank, alpha=p.lora_alpha, dropout=p.lora_dropout,
                           targets=p.lora_targets, seed=p.seed)
    adapter.requires_grad_(True).train()
    # The image stage never mirrors: its embedding describes the unmirrored image (text fits both).
    return ConditionedVAR(model, vqvae.quantize, cid, hflip=p.hflip and stage == "text", adapter=adapter,
                          column=column, alpha=p.alpha, beta=p.beta).train()


def _save_pipeline(folder: Path, inner: ConditionedVAR, p, *, var: str, meta: dict, vae_spec: str, column: str,
                   cid: int, encoder: dict, stage: str, data, init, preset: str, res, evaluation: dict | None,
                   data_content) -> PipelineFolder:
    """The trained pipeline: the VAR (LoRA as --lora-save says), the adapter, pipeline.json with the sampling
    defaults and the training record. Local paths are relative to the folder: it is uploaded as it is."""
    sampling = {"cfg": p.sample_cfg, "top_k": p.sample_top_k, "top_p": p.sample_top_p, "alpha": p.alpha,
                "beta": p.beta, "class_id": cid, "more_smooth": False}
    return PipelineFolder.save(
        folder, var=inner.var, var_spec=var, var_changed=p.lora,
        var_extra={k: v for k, v in meta.items() if k not in ("popyou_type", "config", "lora")},
        lora_save=p.lora_save, vqvae=portable_spec(vae_spec, folder), adapter=inner.adapter.cpu(),
        adapter_extra={"trained_on": column, "class_id": cid}, encoder=encoder, sampling=sampling,
        train={"stage": stage, "data": portable_spec(data, folder), "data_content": data_content,
               "steps": res.steps, "init": portable_spec(init, folder), "lora": p.lora, "eval": evaluation,
               "preset": preset, "val_fraction": p.val_fraction,
               "resumed_from": portable_spec(res.resumed_from, folder), "history": res.history})


def train_adapter(*, data: Path, out: Path, stage: str = "image", preset: str = "full", init: str | None = None,
                  text_field: str = "prompt", class_id: int | None = None, vae: str | None = None,
                  push: str | None = None, private: bool = False, overwrite: bool = False, console=None, on_step=None,
                  **options) -> AdapterResult:
    """Runs stage 2 or 3. `options` are TrainPreset fields (var, lora, alpha, beta, lr, ...; None = the preset's)."""
    if stage not in ("image", "text") or text_field not in ("prompt", "caption"):
        raise PopyouError("--stage must be image or text, --text-field prompt or caption")
    p = train_preset(ADAPTER_PRESETS, preset, stage="train-adapter", **options)
    check_training(p)  # every number in its range (bounds.py), before the folder is made
    out = ensure_writable_dir(Path(out))
    acc = make_accelerator(p, out, dtype_from_preset=preset if options.get("mixed_precision") is None else None)
    lock = lock_run(acc, out, "popyou train-adapter")  # one run per folder: a second one is refused

    # --- every input check before the first step
    adapter, init_cfg, var = _init_from(init, p.var)
    if var is None:
        raise PopyouError("--var is needed (the model folder made by 'popyou finetune'), or --init PIPELINE")
    model, meta = load_var_lora(var)
    column = "siglip_image" if stage == "image" else f"siglip_text_{text_field}"
    enc = load_encoded(Path(data), for_stage="train-adapter", columns=[column], patch_nums=model.config.patch_nums,
                       console=console if acc.is_main_process else None)
    rows, settings = enc["rows"], enc["settings"]
    D, C = rows[column].shape[1], model.config.embed_dim
    encoder = _encoder_entry(settings, D, stage, text_field, init_cfg, data)
    adapter = _adapter_for(adapter, D, C, p, data=data, column=column, init=init)
    cid = _class_id(class_id, meta, init_cfg, var, model.num_classes)
    vqvae, vae_spec = load_matching_vqvae(vae, model, rows["codes"], data=data, settings=settings, meta=meta,
                                          var_spec=var)

    trainer = _frozen_var_trainer(model, vqvae, cid, adapter, column, stage, p)
    train_rows, val_rows = split_rows(rows, p.val_fraction)
    show = val_rows if val_rows is not None else train_rows
    vqvae.to(acc.device)

    def loss_fn(m, batch):
        logits, target = m(batch)
        return next_scale_loss(logits, target, p.label_smoothing)

    sample_fn = sample_grid_fn(vqvae, n=p.n_samples, cfg=p.sample_cfg, top_k=p.sample_top_k, top_p=p.sample_top_p,
                               device=acc.device, embeddings=show[column]) if p.n_samples > 0 else None
    run = {"stage": f"train-adapter {stage}", "text_field": text_field if stage == "text" else None,
           "data": data_fingerprint(data), "var": fingerprint(var), "init": fingerprint(init),
           "vae": fingerprint(vae_spec), "class_id": cid}
    res = train(trainer, train_rows, loss_fn, p, out, accelerator=acc, tokens_per_row=base_var(trainer.var).config.L,
                sample_fn=sample_fn, console=console if acc.is_main_process else None, on_step=on_step,
                overwrite=overwrite, project="popyou-train-adapter", run=run,
                tracker_config={"stage": f"train-adapter-{stage}", "data": portable_spec(data, out),
                                **asdict(p), "var": portable_spec(var, out), "resume": portable_spec(p.resume, out)})
    result = AdapterResult(steps=res.steps, losses=res.losses, rows=len(train_rows["codes"]), skipped=enc["skipped"],
                           tokens_per_s=res.tokens_per_s, world_size=acc.num_processes,
                           is_main_process=acc.is_main_process, class_id=cid, checkpoint=res.last_checkpoint,
                           pipeline=out / "pipeline")
    folder = out / "pipeline"
    if acc.is_main_process:
        inner = acc.unwrap_model(trainer)
        if val_rows is not None:
            result.eval = conditioning_eval(inner, val_rows, acc.device, batch_size=max(p.batch_size, 64))
            atomic_write_json(out / "eval.json", result.eval)
        saved = _save_pipeline(folder, inner, p, var=var, meta=meta, vae_spec=vae_spec, column=column, cid=cid,
                               encoder=encoder, stage=stage, data=data, init=init, preset=preset, res=res,
                               evaluation=result.eval, data_content=run["data"])
        write_model_card(folder, "pipeline", repo=push, facts={
            "stage": "train-adapter", "stage_name": stage, "preset": preset, "steps": res.steps,
            "data": portable_spec(data, folder), "settings": asdict(p), "losses": res.losses, "eval": result.eval,
            "embedding": "image" if stage == "image" else f"text ({text_field})", "var": var})
        if push:
            result.pushed = saved.push_to_hub(push, private=private)
    acc.wait_for_everyone()
    if lock is not None:
        lock.release()
    return result
