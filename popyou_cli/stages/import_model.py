"""`popyou import`: the original PopYOU checkpoint (a local file or a Hub repo) -> a popyou pipeline folder.

All the work is `popyou_cli.original.import_checkpoint`; this stage only words the result.
"""
from __future__ import annotations

from pathlib import Path

from ..original import import_checkpoint


def import_model(source: str, out: Path, *, filename: str | None = None, revision: str | None = None,
                 text_encoder: str | None = None, tokenizer: str | None = None, overwrite: bool = False) -> dict:
    return import_checkpoint(source, out, filename=filename, revision=revision,
                             text_encoder=text_encoder, tokenizer=tokenizer, overwrite=overwrite)


def summary(res: dict) -> str:
    var, vae, adapter = res["var"], res["vqvae"], res["adapter"]
    s = res["pipeline"]["sampling"]
    return (f"import: wrote {res['out']} in {res['seconds']:.1f} s: VAR depth {var.depth} width {var.embed_dim} "
            f"({res['lora_layers_merged']} LoRA layers merged), VQ-VAE {vae.vocab_size} codes (bilinear resize), "
            f"adapter {adapter.embed_dim}->{adapter.hidden_dim}->{adapter.var_dim}, text encoder "
            f"{res['text_encoder_dim']}-wide; defaults class {s['class_id']}, cfg {s['cfg']}, top-p {s['top_p']}, "
            f"beta {s['beta']}. Try: popyou sample \"a wizard funko pop\" --pipeline {res['out']}")
