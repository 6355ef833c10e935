"""`popyou import`: the original PopYOU checkpoint (a local file or a Hub repo) -> a popyou pipeline folder.

All the work is `popyou_cli.original.import_checkpoint`; this stage only words the result.
"""
from __future__ import annotations

from pathlib import Path

from ..original import import_checkpoint


def import_model(source: str, out: Path, **options) -> dict:
    """options: those of import_checkpoint (filename, revision, text_encoder, tokenizer, class_id, overwrite)."""
    return import_checkpoint(source, out, **options)


def summary(res: dict) -> str:
    var, vae, adapter = res["var"], res["vqvae"], res["adapter"]
    s = res["pipeline"]["sampling"]
    return (f"import: wrote {res['out']} in {res['seconds']:.1f} s: VAR depth {var.depth} width {var.embed_dim} "
            f"({res['lora_layers_merged']} LoRA layers merged), VQ-VAE {vae.vocab_size} codes (bilinear resize"
            f"{'' if vae.has_encoder else ', decoder side only'}), "
            f"adapter {adapter.embed_dim}->{adapter.hidden_dim}->{adapter.var_dim}, text encoder "
            f"{res['text_encoder_dim']}-wide; defaults class {s['class_id']}, cfg {s['cfg']}, top-p {s['top_p']}, "
            f"beta {s['beta']}. Try: popyou sample \"a wizard funko pop\" --pipeline {res['out']}")
