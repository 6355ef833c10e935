"""VAR with an optional peft LoRA, and the pipeline folder that `train-adapter` writes and `sample` reads.

Pipeline folder (architecture.md)::

    pipeline.json          parts and sampling defaults (cfg, top_k, top_p, alpha, beta, class_id)
    var/                   popyou model folder (config.json + model.safetensors, LoRA merged), or with the
                           LoRA kept separate (peft's adapter_model.safetensors + adapter_config.json beside
                           the base). Absent when pipeline.json names a Hub VAR (or "tiny") used unchanged.
    adapter.safetensors    the embedding -> cond_delta adapter
    adapter.json

Nothing in it points outside itself except Hub ids, so the folder can be pushed to the Hub as it is.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import PopyouError
from .models.adapter import CondAdapter, load_adapter, save_adapter
from .models.checkpoints import load_var, load_vqvae, save_model
from .models.var import VAR

PIPELINE_JSON = "pipeline.json"
LORA_CONFIG = "adapter_config.json"  # peft's file name: its presence marks a separate LoRA


# ------------------------------------------------------------------------------------------ LoRA
def apply_lora(var: VAR, *, rank: int, alpha: float, dropout: float, targets: str | list[str],
               train_modules: tuple[str, ...] = (), seed: int = 0) -> nn.Module:
    """VAR wrapped by peft with LoRA on `targets` (module-name suffixes); `train_modules` are trained in full
    (e.g. class_emb, so that a new class row can still move). Refuses targets that would train nothing.
    The LoRA init draws from `seed`, not from the global RNG, so the same command gives the same run."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise PopyouError(f"LoRA needs rank >= 1, alpha > 0 and dropout in [0, 1) (got {rank}, {alpha}, {dropout})")
    targets = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    names = [n for n, m in var.named_modules() if isinstance(m, nn.Linear)]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise PopyouError(f"--lora-targets: no Linear layer of this VAR is called '{t}' "
                              "(try proj, fc1, fc2, ada_lin.1, word_embed, head)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(var, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                               target_modules=targets, modules_to_save=list(train_modules) or None))
    # A LoRA layer whose module is never called (VAR's attention reads mat_qkv.weight directly with F.linear)
    # would train nothing and then change the weights when merged: find those with one dummy forward.
    called, hooks = set(), []
    for n, m in model.named_modules():
        if isinstance(m, LoraLayer):
            hooks.append(m.register_forward_hook(lambda mod, i, o, n=n: called.add(n)))
    cfg = var.config
    with torch.no_grad():
        model(torch.zeros(1, dtype=torch.long), torch.zeros(1, cfg.L - cfg.patch_nums[0] ** 2, cfg.z_channels))
    for h in hooks:
        h.remove()
    unused = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)
                     and n not in called})
    if unused:
        raise PopyouError(f"--lora-targets: {', '.join(unused)} is not called as a module in VAR's forward (its "
                          "weight is used directly), so LoRA there would have no effect; leave it out")
    return model


def base_var(model: nn.Module) -> VAR:
    """The VAR inside a peft wrapper (LoRA layers still injected), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_var(model: nn.Module, folder: Path, extra: dict, lora_save: str = "merged") -> Path:
    """A popyou model folder. A peft model is merged (default) or kept separate (peft files beside the base
    weights). Consumes the peft wrapper: call it last."""
    if not hasattr(model, "get_base_model"):
        return save_model(model, folder, extra)
    if lora_save == "separate":
        model.save_pretrained(str(folder))
        return save_model(model.unload(), folder, {**extra, "lora": LORA_CONFIG})
    return save_model(model.merge_and_unload(), folder, extra)


def load_var_lora(spec: str, device: str | torch.device = "cpu") -> tuple[VAR, dict]:
    """load_var, plus a separate LoRA in a local model folder merged in (load_var alone ignores it)."""
    model, meta = load_var(spec, device="cpu")
    folder = Path(spec).expanduser()
    if folder.is_dir() and (folder / LORA_CONFIG).is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return model.to(device).eval(), meta


# ------------------------------------------------------------------------------------------ pipeline folder
@dataclass
class Pipeline:
    var: VAR
    vqvae: nn.Module
    adapter: CondAdapter
    encoder_model: str  # open_clip model name ("tiny" for the stand-in)
    encoder_pretrained: str | None
    embedding: str  # "image" or "text": what the adapter was trained on
    sampling: dict  # cfg, top_k, top_p, alpha, beta, class_id, more_smooth
    config: dict = field(default_factory=dict)  # pipeline.json as read

    def load_encoder(self, device="cpu"):
        """(model, preprocess, tokenizer) of the SigLIP encoder the adapter expects."""
        from .encoders import load_siglip

        return load_siglip(self.encoder_model, self.encoder_pretrained, device=device)


def is_local(spec: str) -> bool:
    return Path(spec).expanduser().exists()


def save_pipeline(folder: Path, *, var: nn.Module, var_spec: str, var_changed: bool, var_extra: dict,
                  lora_save: str, vqvae: str, adapter: CondAdapter, adapter_extra: dict, encoder: dict,
                  sampling: dict, train: dict) -> Path:
    """Writes the folder: the adapter, the VAR (copied unless it is an unchanged Hub / tiny VAR), then
    pipeline.json last, so a folder with pipeline.json is complete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PIPELINE_JSON).unlink(missing_ok=True)
    save_adapter(adapter, folder, adapter_extra)
    if var_changed or is_local(var_spec):
        save_var(var, folder / "var", var_extra, lora_save)
        var_ref = "var"
    else:
        var_ref = var_spec
    cfg = {"popyou_type": "pipeline", "version": 1, "var": var_ref, "vqvae": vqvae, "encoder": encoder,
           "adapter": {"weights": "adapter.safetensors", "config": "adapter.json"}, "sampling": sampling,
           "train": train}
    tmp = folder / f".{PIPELINE_JSON}.tmp"
    tmp.write_text(json.dumps(cfg, indent=2, default=str))
    os.replace(tmp, folder / PIPELINE_JSON)
    return folder


def load_pipeline(path: str, device: str | torch.device = "cpu") -> Pipeline:
    """The parts of a pipeline folder (a local path or a Hub repo id): VAR (LoRA merged), VQ-VAE, adapter,
    encoder name and tag, sampling defaults. The SigLIP encoder itself loads on demand (Pipeline.load_encoder)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        folder = _hub_snapshot(path)
    pj = folder / PIPELINE_JSON
    if not pj.is_file():
        raise PopyouError(f"{path} is not a popyou pipeline folder (no {PIPELINE_JSON}); "
                          "make one with 'popyou train-adapter'")
    try:
        cfg = json.loads(pj.read_text())
        var_ref, enc = cfg["var"], cfg["encoder"]
    except (ValueError, KeyError) as e:
        raise PopyouError(f"{pj} is not a valid pipeline.json ({e})") from None
    var_spec = str(folder / var_ref) if (folder / var_ref).is_dir() else var_ref
    var, _ = load_var_lora(var_spec, device=device)
    vqvae = load_vqvae(cfg["vqvae"], patch_nums=var.config.patch_nums, device=device)
    adapter, _ = load_adapter(folder, device=device)
    if adapter.config.var_dim != var.config.embed_dim:
        raise PopyouError(f"{path}: the adapter outputs {adapter.config.var_dim} values, the VAR is "
                          f"{var.config.embed_dim} wide")
    return Pipeline(var=var, vqvae=vqvae, adapter=adapter, encoder_model=enc["model"],
                    encoder_pretrained=enc.get("pretrained"), embedding=enc.get("embedding", "image"),
                    sampling=cfg.get("sampling", {}), config=cfg)


def _hub_snapshot(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo))
    except Exception as e:  # offline, missing, private: one line
        raise PopyouError(f"{repo}: not a local folder, and the Hub repo cannot be fetched "
                          f"({type(e).__name__}); pass a local pipeline folder") from None


def push_to_hub(folder: Path, repo: str, private: bool = False) -> str:
    """Uploads exactly the pipeline folder (standard Hugging Face login; no token is stored by popyou)."""
    import huggingface_hub as hf

    try:
        hf.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        info = hf.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                                commit_message="popyou train-adapter pipeline")
    except Exception as e:
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PopyouError(f"--push-to-hub {repo} failed: {line[:200]} (log in with `hf auth login`); the "
                          f"pipeline is saved locally in {folder}") from None
    return str(getattr(info, "commit_url", info))
