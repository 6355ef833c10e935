"""LoRA on VAR through peft: wrap for training, save merged or separate, load a separate LoRA back merged."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from popyou_cli.core.errors import PopyouError
from popyou_cli.models.checkpoints import load_var, save_model
from popyou_cli.models.var import VAR

LORA_CONFIG = "adapter_config.json"  # peft's file name: its presence marks a separate LoRA


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
