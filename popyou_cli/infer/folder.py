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
`PipelineFolder` is its one reader and writer, in the spirit of diffusers' from_pretrained / save_pretrained:
`PipelineFolder.read(path)` parses and checks pipeline.json, `PipelineFolder.save(path, ...)` writes a trained
pipeline, `write_config` writes pipeline.json (last: a folder holding it is complete), `part` finds a part.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from popyou_cli.core.errors import PopyouError
from popyou_cli.core.files import atomic_write_json, resolve_recorded
from popyou_cli.core.formats import PIPELINE_JSON
from popyou_cli.models.adapter import CONFIG as ADAPTER_CONFIG, WEIGHTS as ADAPTER_WEIGHTS, CondAdapter, save_adapter
from popyou_cli.models.lora import save_var

REQUIRED = ("var", "vqvae", "encoder")  # the keys every pipeline.json has


@dataclass
class PipelineFolder:
    path: Path
    config: dict = field(default_factory=dict)  # pipeline.json as read or written
    shown: str = ""  # the folder as the user named it, for messages

    @staticmethod
    def is_pipeline(path: str | Path) -> bool:
        """Whether `path` holds a pipeline.json (written last: the folder is complete)."""
        return (Path(path) / PIPELINE_JSON).is_file()

    # ------------------------------------------------------------------------------------------ reading
    @classmethod
    def read(cls, path: str | Path, shown: str | None = None) -> "PipelineFolder":
        """The folder with its pipeline.json, checked for the keys every pipeline has; `shown`: the folder as the
        user named it. A one-line error names the folder meant when it is a run folder."""
        folder, shown = Path(path), str(shown or path)
        pj = folder / PIPELINE_JSON
        if not pj.is_file():
            hint = ""
            if cls.is_pipeline(folder / "pipeline"):
                hint = f"; did you mean {Path(shown) / 'pipeline'}?"
            elif (folder / "model" / "config.json").is_file():
                hint = (f"; it is a finetune run folder: sample its class with --var {Path(shown) / 'model'} "
                        "--class-id N, or train a pipeline with popyou train-adapter")
            raise PopyouError(f"{shown} is not a popyou pipeline folder (no {PIPELINE_JSON})"
                              f"{hint or '; make one with popyou train-adapter or popyou import'}")
        try:
            cfg = json.loads(pj.read_text())
            for key in REQUIRED:
                cfg[key]
        except (ValueError, KeyError, TypeError) as e:
            raise PopyouError(f"{pj} is not a valid pipeline.json ({type(e).__name__}: {e})") from None
        return cls(folder, cfg, shown)

    def part(self, key: str) -> str:
        """The part pipeline.json names under `key` ("var", "vqvae"): its path inside the folder, else the spec as
        recorded (a Hub id, "tiny")."""
        return resolve_recorded(self.config[key], self.path)

    # ------------------------------------------------------------------------------------------ writing
    @classmethod
    def write_config(cls, path: str | Path, entries: dict) -> "PipelineFolder":
        """pipeline.json with `entries` (var, vqvae, encoder, sampling, ...) after popyou's type and version.
        Write it last: a folder holding it is complete."""
        cfg = {"popyou_type": "pipeline", "version": 1, **entries}
        atomic_write_json(Path(path) / PIPELINE_JSON, cfg, default=str)
        return cls(Path(path), cfg, str(path))

    @staticmethod
    def adapter_entry() -> dict:
        """pipeline.json's `adapter` entry: the files save_adapter writes."""
        return {"weights": ADAPTER_WEIGHTS, "config": ADAPTER_CONFIG}

    @classmethod
    def save(cls, path: str | Path, *, var: nn.Module, var_spec: str, var_changed: bool, var_extra: dict,
             lora_save: str, vqvae: str, adapter: CondAdapter, adapter_extra: dict, encoder: dict, sampling: dict,
             train: dict) -> "PipelineFolder":
        """Writes a trained pipeline: the adapter, the VAR (copied unless it is an unchanged Hub / tiny VAR), then
        pipeline.json last, so a folder with pipeline.json is complete."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PIPELINE_JSON).unlink(missing_ok=True)
        save_adapter(adapter, folder, adapter_extra)
        if var_changed or Path(var_spec).expanduser().exists():
            save_var(var, folder / "var", var_extra, lora_save)
            var_ref = "var"
        else:
            var_ref = var_spec
        return cls.write_config(folder, {"var": var_ref, "vqvae": vqvae, "encoder": encoder,
                                         "adapter": cls.adapter_entry(), "sampling": sampling, "train": train})

    def push_to_hub(self, repo: str, private: bool = False) -> str:
        """Uploads exactly the folder (hub.push_folder: standard Hugging Face login, no token stored)."""
        from popyou_cli.core.hub import push_folder

        return push_folder(self.path, repo, private=private, message="popyou train-adapter pipeline")
