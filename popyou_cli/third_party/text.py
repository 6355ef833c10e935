"""The text encoder of a pipeline, whichever library provides it.

A pipeline's `encoder` entry (pipeline.json) names it:

- open_clip (what popyou's own stages train with): `{"library": "open_clip", "model": NAME, "pretrained": TAG}`;
  an entry without "library" is open_clip (pipelines written before transformers encoders existed);
- transformers SigLIP / SigLIP2 (what the original PopYOU model uses):
  `{"library": "transformers", "path": "text_encoder", "tokenizer": "tokenizer"}`, paths relative to the folder.

Either way the object is called with a list of prompts and returns L2-normalised float32 embeddings (P, dim) on
its device: what the adapter takes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from popyou_cli.core.errors import PopyouError


class OpenClipText:
    """open_clip SigLIP: text embeddings for the adapter, and image embeddings for eval's scores."""

    def __init__(self, model, preprocess, tokenizer):
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer

    @property
    def dim(self) -> int:
        from popyou_cli.third_party.siglip import embedding_dim

        return embedding_dim(self.model)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        from popyou_cli.third_party.siglip import encode_texts

        return encode_texts(self.model, self.tokenizer, list(prompts))

    def encode_images(self, images) -> torch.Tensor:
        """PIL images -> L2-normalised float32 embeddings (N, dim) on CPU."""
        from popyou_cli.third_party.siglip import encode_images

        device = next(self.model.parameters()).device
        pix = torch.stack([self.preprocess(im) for im in images]).to(device)
        return encode_images(self.model, pix).float().cpu()

    def to(self, device) -> "OpenClipText":
        self.model.to(device)
        return self


def library_of(spec: dict) -> str:
    return spec.get("library", "open_clip")


def load_text_encoder(spec: dict, folder: Path | None = None, device="cpu"):
    """The text encoder a pipeline.json `encoder` entry names (paths relative to `folder`)."""
    library = library_of(spec)
    if library == "open_clip":
        from popyou_cli.third_party.siglip import load_siglip

        return OpenClipText(*load_siglip(spec["model"], spec.get("pretrained"), device=device))
    if library == "transformers":
        from popyou_cli.third_party.hf_text import load_hf_text_encoder

        from popyou_cli.core.files import resolve_recorded

        def local(key: str) -> str:
            return resolve_recorded(spec[key], folder) if folder is not None else spec[key]

        return load_hf_text_encoder(local("path"), tokenizer=local("tokenizer"), device=device)
    raise PopyouError(f"unknown text encoder library '{library}' in pipeline.json (use open_clip or transformers)")
