"""The pipeline folder that `train-adapter` (and `popyou import`) write and `Pipeline.from_pretrained` reads.

    pipeline.json          parts and sampling defaults (cfg, top_k, top_p, alpha, beta, class_id), provenance
    var/                   popyou model folder (config.json + model.safetensors, LoRA merged), or with the
                           LoRA kept separate (peft's adapter_model.safetensors + adapter_config.json beside
                           the base). Absent when pipeline.json names a Hub VAR (or "tiny") used unchanged.
    vqvae/                 optional: a popyou VQ-VAE folder (else pipeline.json names a Hub VQ-VAE or "tiny")
    text_encoder/, tokenizer/   optional: a transformers text encoder (imported original models)
    adapter.safetensors    the embedding -> cond_delta adapter
    adapter.json

Nothing in it points outside itself except Hub ids, so the folder can be pushed to the Hub as it is.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from popyou_cli.core.errors import PopyouError
from popyou_cli.core.files import atomic_write_json
from popyou_cli.core.formats import PIPELINE_JSON
from popyou_cli.models.adapter import CondAdapter, save_adapter
from popyou_cli.models.lora import save_var


def read_pipeline_json(folder: Path, shown: str) -> dict:
    """pipeline.json of `folder` (shown to the user as `shown`), checked for the keys every pipeline has."""
    pj = folder / PIPELINE_JSON
    if not pj.is_file():
        hint = ""
        if (folder / "pipeline" / PIPELINE_JSON).is_file():
            hint = f"; did you mean {Path(shown) / 'pipeline'}?"
        elif (folder / "model" / "config.json").is_file():
            hint = (f"; it is a finetune run folder: sample its class with --var {Path(shown) / 'model'} --class-id N, "
                    "or train a pipeline with popyou train-adapter")
        raise PopyouError(f"{shown} is not a popyou pipeline folder (no {PIPELINE_JSON}){hint or '; make one with popyou train-adapter or popyou import'}")
    try:
        cfg = json.loads(pj.read_text())
        cfg["var"], cfg["vqvae"], cfg["encoder"]
    except (ValueError, KeyError, TypeError) as e:
        raise PopyouError(f"{pj} is not a valid pipeline.json ({type(e).__name__}: {e})") from None
    return cfg


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
    atomic_write_json(folder / PIPELINE_JSON, cfg, default=str)
    return folder


def push_to_hub(folder: Path, repo: str, private: bool = False) -> str:
    """Uploads exactly the pipeline folder (hub.push_folder: standard Hugging Face login, no token stored)."""
    from popyou_cli.core.hub import push_folder

    return push_folder(folder, repo, private=private, message="popyou train-adapter pipeline")
