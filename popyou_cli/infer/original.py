"""The original PopYOU model's files, read: the two layouts of one module (VQ-VAE + VAR with peft LoRA + SigLIP
text tower + adapter), split into popyou's parts. docs/formats.md describes both:
  * the demo Space's `VARtext_v1.pth` (`spaces/AmitIsraeli/PopYou`, the default model): a plain state dict,
    saved after the demo deleted the VQ-VAE's encoder, so it holds no `vae.encoder.*`;
  * a PyTorch Lightning checkpoint of the training module: the same keys under `state_dict`, with the encoder,
    plus `hyper_parameters` (start_class_id, lora_alpha).
Keys, by prefix:
  var.base_model.model.*    VAR wrapped by peft: LoRA merged here as W + (lora_alpha / r) * B @ A
                            (a plain or already merged VAR under var.* is taken as it is)
  vae.*                     the VQ-VAE; the original's quantizer resizes with bilinear, so it is saved with
                            resize "bilinear"; without its encoder it is saved decoder side only
  adapter.*                 norm0 / layer1 / GELU / layer2 / norm2, mapped onto popyou's CondAdapter
  siglip_text_encoder.*     transformers SiglipTextModel weights (optional: else the encoder's own)
Weights are read with torch.load(weights_only=True, mmap=True): popyou never runs pickled code, and the file is
paged in rather than copied. import_model.py writes the pipeline folder; resolve.py finds the model on the Hub.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch

from popyou_cli.core import hub
from popyou_cli.core.devices import on_meta
from popyou_cli.core.errors import PopyouError, short_error
from popyou_cli.core.formats import PIPELINE_JSON
from popyou_cli.core.presets import DEFAULT_PIPELINE
from popyou_cli.models.adapter import AdapterConfig, CondAdapter
from popyou_cli.models.checkpoints import check_keys

DEFAULT_CLASS_ID = 578  # the original demo's class when the checkpoint does not name one
DEFAULT_LORA_ALPHA = 32  # the original's LoraConfig; its checkpoints do not record it
CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".pt", ".safetensors")
ORIGINAL_SAMPLING = {"alpha": 1.0, "beta": 1.0, "cfg": 1.5, "top_k": 0, "top_p": 0.9, "more_smooth": False}
_PEFT_PREFIX = "base_model.model."
_PARTS = {"var.": "var", "vae.": "vqvae", "adapter.": "adapter", "siglip_text_encoder.": "text"}
_ADAPTER_NAMES = {"norm0": "norm_in", "layer1": "fc1", "layer2": "fc2", "norm2": "norm_out"}
_EXPECTS = ("import expects the original PopYOU model: the demo Space's VARtext_v1.pth or a Lightning checkpoint "
            "(var.*, vae.*, adapter.* and optionally siglip_text_encoder.* weights)")
WHERE_IT_LIVES = (f"the original model is {DEFAULT_PIPELINE} (the demo Space); a local copy imports with "
          "`popyou import FILE --out DIR`")


# ------------------------------------------------------------------------------------------ reading
def read_checkpoint(path: Path) -> dict:
    """The checkpoint as a dict (tensors memory-mapped); one-line errors for anything else."""
    name = path.name
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return {"state_dict": load_file(str(path))}
        except Exception as e:  # noqa: BLE001
            raise PopyouError(f"{name} is not a readable safetensors file ({short_error(e, 160)}); {_EXPECTS}") from None
    if zipfile.is_zipfile(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001
            refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            if refused or "Weights only load failed" in str(e):
                what = refused[1] if refused else "an object"
                raise PopyouError(f"{name}: torch's safe loader refused to unpickle {what} (popyou never runs pickled "
                                  "code); re-save the checkpoint's state_dict with plain tensors and dicts") from None
            raise PopyouError(f"{name} is a damaged PyTorch checkpoint ({short_error(e, 160)}); {_EXPECTS}") from None
    if head.startswith(b"PK\x03\x04"):
        raise PopyouError(f"{name} is a truncated or damaged PyTorch checkpoint (a zip archive without its "
                          f"directory); download it again")
    try:  # the legacy (pre-zip) torch.save format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001
        raise PopyouError(f"{name} is not a PyTorch checkpoint (starts with {head[:8]!r}); {_EXPECTS}") from None


def split_state_dict(ckpt, name: str) -> tuple[dict[str, dict], dict]:
    """({part: state dict without its prefix}, hyper_parameters); a one-line error for what is not the original."""
    if not isinstance(ckpt, dict):
        raise PopyouError(f"{name} holds a {type(ckpt).__name__}, not a checkpoint dict; {_EXPECTS}")
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt.get("hyper_parameters"), dict) else {}
    sd = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else ckpt
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        keys = ", ".join(map(str, list(ckpt)[:6]))
        raise PopyouError(f"{name} holds a dict with keys {keys} and no state_dict of tensors; {_EXPECTS}")
    parts: dict[str, dict] = {}
    unknown = []
    for k, v in sd.items():
        prefix = next((p for p in _PARTS if k.startswith(p)), None)
        if prefix is None:
            unknown.append(k)
        else:
            parts.setdefault(_PARTS[prefix], {})[k[len(prefix):]] = v
    if not parts:
        raise PopyouError(f"{name} holds {_describe_bare(sd)}, not the original PopYOU model; {_EXPECTS}")
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise PopyouError(f"{name}: unexpected keys outside var./vae./adapter./siglip_text_encoder. "
                          f"{len(unknown)}: {shown}")
    missing = [p for p, part in (("var.*", "var"), ("vae.*", "vqvae")) if part not in parts]
    if missing:
        raise PopyouError(f"{name} has no {' and no '.join(missing)} weights (found: "
                          f"{', '.join(sorted(parts))}); {_EXPECTS}")
    if "adapter" not in parts:
        raise PopyouError(f"{name} has VAR and VQ-VAE weights but no adapter.* weights (a class-conditional "
                          f"checkpoint, not the text model); {_EXPECTS}")
    return parts, hparams


def _describe_bare(sd: dict) -> str:
    if "class_emb.weight" in sd and any(k.startswith("blocks.") for k in sd):
        return "a plain VAR state dict (like the official var_d16.pth; sample it with `popyou sample --class-id N --var FILE`)"
    if "quantize.embedding.weight" in sd:
        return "a plain VQ-VAE state dict (like the official vae_ch160v4096z32.pth)"
    return f"a state dict with keys like {', '.join(list(sd)[:4])}"


def merge_lora(sd: dict[str, torch.Tensor], lora_alpha: float = DEFAULT_LORA_ALPHA, *,
               in_place: bool = False) -> tuple[dict, int]:
    """peft LoRA keys (`X.base_layer.weight`, `X.lora_A.<name>.weight` (r, in), `X.lora_B.<name>.weight` (out, r))
    -> plain keys with W = W_base + (lora_alpha / r) * B @ A. Returns (state dict, number of merged layers).
    in_place: add into float32 base weights rather than into new tensors. The import passes True: its tensors map
    the file privately (copy-on-write), so the file is never written and a merged page replaces the file's page
    in memory instead of adding a second copy of the VAR (the peak stays under twice the file's size)."""
    out, lora, names = {}, {}, set()
    for k, v in sd.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.([^.]+)\.weight", k)
        if m:
            lora.setdefault(m[1], {})[m[2]] = v
            names.add(m[3])
        elif ".lora_" in k:
            raise PopyouError(f"the VAR holds a LoRA tensor popyou cannot merge: {k} (only Linear LoRA A/B)")
        else:
            out[k.replace(".base_layer.", ".")] = v
    if len(names) > 1:
        raise PopyouError(f"the VAR holds several LoRA adapters ({', '.join(sorted(names))}); import merges one")
    for mod, ab in lora.items():
        w_key = f"{mod}.weight"
        if set(ab) != {"A", "B"} or w_key not in out:
            raise PopyouError(f"incomplete LoRA layer {mod}: needs lora_A, lora_B and base_layer.weight")
        A, B, W = ab["A"], ab["B"], out[w_key]
        r = A.shape[0]
        if B.shape[1] != r or (B.shape[0], A.shape[1]) != tuple(W.shape):
            raise PopyouError(f"LoRA layer {mod}: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit W "
                              f"{tuple(W.shape)}")
        delta = (B.float() @ A.float()) * (lora_alpha / r)  # peft's order: (B @ A) * scaling, then added
        if in_place and W.dtype == torch.float32:
            W.add_(delta)  # the same sum as below, bit for bit
        else:
            out[w_key] = (W.float() + delta).to(W.dtype)
        del delta
    return out, len(lora)


def _var_state_dict(part: dict, lora_alpha: float) -> tuple[dict, int]:
    if all(k.startswith(_PEFT_PREFIX) for k in part):
        part = {k[len(_PEFT_PREFIX):]: v for k, v in part.items()}
    return merge_lora(part, lora_alpha, in_place=True)  # read_checkpoint's tensors: a private mapping


def _adapter(part: dict, var_dim: int) -> CondAdapter:
    """The original's adapter (norm0, layer1, GELU, layer2, norm2) as popyou's CondAdapter; widths from the
    tensors. Keys it does not know keep their name, so the strict check lists them."""
    rename = lambda k: f"{_ADAPTER_NAMES[k.partition('.')[0]]}.{k.partition('.')[2]}"  # noqa: E731
    sd = {rename(k) if k.partition(".")[0] in _ADAPTER_NAMES else k: v for k, v in part.items()}
    try:
        cfg = AdapterConfig(embed_dim=sd["norm_in.weight"].shape[0], var_dim=sd["norm_out.weight"].shape[0],
                            hidden_dim=sd["fc1.weight"].shape[0])
    except KeyError as e:
        raise PopyouError(f"the adapter weights miss {e} (found: {', '.join(sorted(part))})") from None
    if cfg.var_dim != var_dim:
        raise PopyouError(f"the adapter outputs {cfg.var_dim} values but the VAR is {var_dim} wide")
    with on_meta():
        adapter = CondAdapter(cfg)
    check_keys(adapter, sd, "the checkpoint's adapter.* weights (norm0, layer1, layer2, norm2)")
    adapter.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    return adapter.eval()


def pick_checkpoint(listing: hub.RepoListing) -> str:
    found = [f for f in listing.files if f.lower().endswith(CHECKPOINT_SUFFIXES)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise PopyouError(f"the Hub repo '{listing.repo}' holds no checkpoint (.ckpt/.pth/.pt/.safetensors) and no "
                          f"{PIPELINE_JSON} (files: {', '.join(listing.files[:10]) or 'none'}); {WHERE_IT_LIVES}")
    raise PopyouError(f"the Hub repo '{listing.repo}' holds several checkpoints ({', '.join(found)}); name one, e.g. "
                      f"{listing.ref.file(found[0])}, or pick it with --filename")
