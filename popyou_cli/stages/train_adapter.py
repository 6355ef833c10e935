"""`popyou train-adapter`: stages 2 and 3. A SigLIP embedding steers VAR through the adapter.

cond = alpha * class_emb[class_id] + beta * adapter(embedding); conditioning dropout (VAR's, in training mode)
replaces the class by the null row and zeroes delta together, so CFG has an unconditional branch. The VAR is
frozen (its stochastic depth off), optionally with a peft LoRA on top; the adapter always trains.
`--stage image` reads `siglip_image`; `--stage text` reads `siglip_text_prompt` (or `_caption`) and usually
starts from the image-stage pipeline (`--init`), whose VAR it then reuses. At the end the held-out loss is
measured with the right, shuffled and no embedding: the adapter is useful when right < shuffled.
Output: OUT/pipeline/ (see pipeline.py) beside the run folder's checkpoints/, samples/, metrics.jsonl, eval.json.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .. import runtime
from ..errors import PopyouError
from ..models.adapter import AdapterConfig, CondAdapter, load_adapter
from ..models.checkpoints import load_vqvae
from ..models.var import next_scale_loss
from ..pipeline import PIPELINE_JSON, apply_lora, base_var, load_var_lora, push_to_hub, save_pipeline
from ..presets import ADAPTER_PRESETS, get_preset, resolve
from ..training import TrainConfig, load_encoded, make_accelerator, teacher_forcing, train


def split_rows(rows: dict[str, torch.Tensor], val_fraction: float, seed: int = 0):
    """(train rows, held-out rows): a fixed permutation (seed 0 by default), independent of the training seed."""
    n = len(rows["codes"])
    n_val = int(round(n * val_fraction)) if val_fraction > 0 else 0
    if n_val and n - n_val < 1:
        raise PopyouError(f"--val-fraction {val_fraction} leaves no training rows")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tr, va = perm[n_val:].sort().values, perm[:n_val].sort().values
    return {k: v[tr] for k, v in rows.items()}, ({k: v[va] for k, v in rows.items()} if n_val else None)


class AdapterTrainer(nn.Module):
    def __init__(self, var: nn.Module, adapter: CondAdapter, quantizer: nn.Module, class_id: int, column: str,
                 alpha: float, beta: float, hflip: bool):
        super().__init__()
        self.var, self.adapter, self.quantizer = var, adapter, quantizer
        self.class_id, self.column, self.alpha, self.beta, self.hflip = class_id, column, alpha, beta, hflip
        self.patch_nums = base_var(var).config.patch_nums

    def forward(self, batch: dict, emb: torch.Tensor | None = None, use_delta: bool = True):
        """(logits, target). emb overrides the batch's embeddings (the shuffled-conditioning check)."""
        x, target = teacher_forcing(self.quantizer, batch, self.patch_nums, self.hflip, self.training)
        delta = self.adapter(batch[self.column] if emb is None else emb) if use_delta else None
        labels = torch.full((x.shape[0],), self.class_id, device=x.device)
        return self.var(labels, x, cond_delta=delta, alpha=self.alpha, beta=self.beta), target


@torch.no_grad()
def conditioning_eval(model: AdapterTrainer, rows: dict, device, batch_size: int = 64) -> dict:
    """Held-out next-scale loss (eval mode, no dropout) with the right embeddings, with embeddings shuffled
    among the rows (a fixed permutation), and with no delta (the class alone)."""
    was = model.training
    model.eval()
    n = len(rows["codes"])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    sums = {"right": 0.0, "shuffled": 0.0, "class_only": 0.0}
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(n, s + batch_size))
        batch = {k: v[idx].to(device) for k, v in rows.items()}
        other = rows[model.column][perm[idx]].to(device)
        for name, kw in (("right", {}), ("shuffled", {"emb": other}), ("class_only", {"use_delta": False})):
            logits, target = model(batch, **kw)
            sums[name] += next_scale_loss(logits, target).item() * len(idx)
    model.train(was)
    return {k: v / n for k, v in sums.items()} | {"rows": n}


def train_adapter(*, data: Path, out: Path, stage: str = "image", preset: str = "full", var: str | None = None,
                  init: str | None = None, text_field: str = "prompt", class_id: int | None = None,
                  lora: bool = False, lora_save: str = "merged", alpha: float = 1.0, beta: float = 1.0,
                  vae: str | None = None, hflip: bool = True, push: str | None = None, overwrite: bool = False,
                  console=None, on_step=None, **overrides) -> dict:
    p = resolve(get_preset(ADAPTER_PRESETS, preset, stage="train-adapter"),
                **{k: v for k, v in overrides.items() if k not in ("epochs", "report_to", "resume", "seed")})
    if stage not in ("image", "text") or text_field not in ("prompt", "caption") or \
            lora_save not in ("merged", "separate"):
        raise PopyouError("--stage must be image or text, --text-field prompt or caption, "
                          "--lora-save merged or separate")
    cfg = TrainConfig.from_preset(p, overrides)
    if not 0 <= p.cond_drop < 1 or not 0 <= p.val_fraction < 1:
        raise PopyouError("--cond-drop and --val-fraction must be in [0, 1)")
    out = runtime.ensure_writable_dir(Path(out))
    acc = make_accelerator(cfg, out)

    # --- every input check before the first step
    adapter, init_cfg = None, {}
    if init is not None:
        init_dir = Path(init)
        adapter, _ = load_adapter(init_dir)
        if (init_dir / PIPELINE_JSON).is_file():
            init_cfg = json.loads((init_dir / PIPELINE_JSON).read_text())
            if var is None:  # the text stage continues on the image stage's VAR (its LoRA merged in)
                ref = init_cfg["var"]
                var = str(init_dir / ref) if (init_dir / ref).is_dir() else ref
    if var is None:
        raise PopyouError("--var is needed (the model folder made by 'popyou finetune'), or --init PIPELINE")
    model, meta = load_var_lora(var)
    column = "siglip_image" if stage == "image" else f"siglip_text_{text_field}"
    enc = load_encoded(Path(data), for_stage="train-adapter", columns=[column], patch_nums=model.config.patch_nums,
                       console=console if acc.is_main_process else None)
    rows, settings = enc["rows"], enc["settings"]
    D, C = rows[column].shape[1], model.config.embed_dim
    if settings.get("siglip_dim") not in (None, D):
        raise PopyouError(f"{data}: manifest says siglip_dim {settings['siglip_dim']}, the column has width {D}")
    encoder = {"model": settings.get("siglip_model"), "pretrained": settings.get("siglip_pretrained"),
               "embedding": stage, "text_field": text_field if stage == "text" else None, "dim": D}
    old_enc = init_cfg.get("encoder", {})
    same_space = (old_enc.get("model"), old_enc.get("pretrained")) == (encoder["model"], encoder["pretrained"])
    if old_enc.get("model") and not same_space:
        raise PopyouError(f"--init was trained on {old_enc['model']}/{old_enc.get('pretrained')} embeddings, {data} "
                          f"holds {encoder['model']}/{encoder['pretrained']}: different embedding spaces")
    if adapter is not None and (adapter.config.embed_dim, adapter.config.var_dim) != (D, C):
        raise PopyouError(f"the embedding width {D} of {data} ({column}) and the VAR width {C} do not fit the adapter "
                          f"from {init} ({adapter.config.embed_dim} -> {adapter.config.var_dim})")
    if adapter is None:
        adapter = CondAdapter(AdapterConfig(D, C, p.hidden_dim or None))
    cid = class_id if class_id is not None else meta.get("new_class_id", init_cfg.get("sampling", {}).get("class_id"))
    if cid is None:
        raise PopyouError(f"{var} names no class made by finetune; pass --class-id")
    if not 0 <= cid < model.num_classes:
        raise PopyouError(f"--class-id {cid} is out of range: this VAR has classes 0..{model.num_classes - 1}")
    vae_spec = vae or settings.get("vqvae") or meta.get("vqvae")
    if not vae_spec:
        raise PopyouError(f"{data} does not name its VQ-VAE (no 'vqvae' in its manifest); pass --vae")
    vqvae = load_vqvae(vae_spec, patch_nums=model.config.patch_nums)
    if int(rows["codes"].max()) >= model.config.vocab_size or vqvae.config.vocab_size != model.config.vocab_size:
        raise PopyouError(f"{data}: codes or the VQ-VAE {vae_spec} do not fit the VAR's "
                          f"{model.config.vocab_size} codes")

    # --- model: frozen VAR (no stochastic depth: nothing in it trains), optional LoRA, trainable adapter
    model.requires_grad_(False)
    for b in model.blocks:
        b.drop_path = 0.0
    model.config.cond_drop_rate = p.cond_drop
    if lora:
        model = apply_lora(model, rank=p.lora_rank, alpha=p.lora_alpha, dropout=p.lora_dropout, targets=p.lora_targets,
                           seed=cfg.seed)
    adapter.requires_grad_(True).train()
    # The image stage never mirrors: its embedding describes the unmirrored image (text fits both).
    wrapper = AdapterTrainer(model, adapter, vqvae.quantize, cid, column, alpha, beta,
                             hflip and stage == "text").train()
    train_rows, val_rows = split_rows(rows, p.val_fraction)
    show = val_rows if val_rows is not None else train_rows
    sample_emb = show[column][:p.n_samples]
    vqvae.to(acc.device)

    def loss_fn(m, batch):
        logits, target = m(batch)
        return next_scale_loss(logits, target, p.label_smoothing)

    def sample_fn(inner: AdapterTrainer, step: int) -> torch.Tensor:
        v = base_var(inner.var)
        delta = inner.adapter(sample_emb.to(acc.device))
        img = v.generate(vqvae, len(sample_emb), cid, cfg=p.sample_cfg, top_k=min(p.sample_top_k, v.config.vocab_size),
                         top_p=p.sample_top_p, cond_delta=delta, alpha=alpha, beta=beta,
                         generator=runtime.generator(acc.device, 0))
        return runtime.grid(runtime.to_uint8(img))

    cfg.extra = {"stage": f"train-adapter-{stage}", "data": str(data), "var": var, "lora": lora, **asdict(p)}
    res = train(wrapper, train_rows, loss_fn, cfg, out, accelerator=acc, tokens_per_row=base_var(model).config.L,
                sample_fn=sample_fn if p.n_samples > 0 else None,
                console=console if acc.is_main_process else None, on_step=on_step, overwrite=overwrite,
                project="popyou-train-adapter")
    result = {"steps": res.steps, "losses": res.losses, "rows": len(train_rows["codes"]), "skipped": enc["skipped"],
              "tokens_per_s": res.tokens_per_s, "world_size": acc.num_processes, "class_id": cid,
              "is_main_process": acc.is_main_process, "pipeline": out / "pipeline", "eval": None, "pushed": None}
    if acc.is_main_process:
        inner = acc.unwrap_model(wrapper)
        if val_rows is not None:
            result["eval"] = conditioning_eval(inner, val_rows, acc.device, batch_size=max(p.batch_size, 64))
            (out / "eval.json").write_text(json.dumps(result["eval"], indent=2))
        sampling = {"cfg": p.sample_cfg, "top_k": p.sample_top_k, "top_p": p.sample_top_p, "alpha": alpha,
                    "beta": beta, "class_id": cid, "more_smooth": False}
        save_pipeline(out / "pipeline", var=inner.var, var_spec=var, var_changed=lora,
                      var_extra={k: v for k, v in meta.items() if k not in ("popyou_type", "config", "lora")},
                      lora_save=lora_save, vqvae=vae_spec, adapter=inner.adapter.cpu(),
                      adapter_extra={"trained_on": column, "class_id": cid}, encoder=encoder, sampling=sampling,
                      train={"stage": stage, "data": str(data), "steps": res.steps, "init": init, "lora": lora,
                             "eval": result["eval"], "preset": preset, "val_fraction": p.val_fraction})
        if push:
            result["pushed"] = push_to_hub(out / "pipeline", push)
    acc.wait_for_everyone()
    return result
