"""The real architectures with random weights, built from configs popyou ships (popyou_cli/third_party/arch, see
SOURCES.md there): what `popyou bench <stage> --arch full` runs, so that real-size runs need no download.

Each builder gives what the stage's loader gives, in the same form and precision, only with random weights:

- :func:`full_text_to_image`: SDXL-Turbo (UNet 2.57B, VAE 84M, CLIP-L and OpenCLIP-bigG text encoders, Euler-A
  trailing scheduler) as a diffusers pipeline, every component in the run dtype as ``from_pretrained(dtype=...)``
  makes it (in float16 the VAE still decodes in float32: its config asks for it, as SDXL's does);
- :func:`full_captioner`: BLIP-2 OPT-2.7b (3.74B), through ``captioner_from_config``: float16 keeps the Q-Former
  and the query tokens in float32, as ``from_pretrained`` does;
- :func:`full_siglip` and :func:`full_vqvae`: open_clip's ViT-B-16-SigLIP (its config ships with open_clip) and
  VAR's VQ-VAE.

Tokenizers are the offline ones popyou already has (CLIP's BPE from open_clip for SDXL, the tiny byte-level one
for BLIP-2, random ids for SigLIP): the ids only feed the timing, the tensor shapes are the real ones. The
weight variant (SDXL-Turbo's fp16 files) is a choice of files, so it has no part here; `popyou download` and
``text_to_image_variant`` make it, and the fake-Hub test checks it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from popyou_cli.core.presets import DEFAULT_SIGLIP

ARCH_DIR = Path(__file__).resolve().parent / "arch"
SDXL_TURBO = ARCH_DIR / "sdxl-turbo"
BLIP2_OPT = ARCH_DIR / "blip2-opt-2.7b"


def read_config(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _random_build(device: torch.device, seed: int):
    """Build on `device` from a fixed seed, leaving the caller's random state alone."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(torch.device(device))
    stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
    torch.manual_seed(seed)
    return stack


def full_text_to_image(device, dtype, seed: int = 0):
    """SDXL-Turbo's pipeline with random weights, ready like ``load_text_to_image``'s."""
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from popyou_cli.core.devices import resolve_device, resolve_dtype
    from popyou_cli.third_party.blip2 import keep_fp32_parts
    from popyou_cli.third_party.common import clip_tokenizer, filter_known_warnings

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, "data")
    filter_known_warnings()
    with _random_build(dev, seed):
        unet = UNet2DConditionModel.from_config(read_config(SDXL_TURBO / "unet" / "config.json"))
        vae = AutoencoderKL.from_config(read_config(SDXL_TURBO / "vae" / "config.json"))
        text = CLIPTextModel._from_config(CLIPTextConfig.from_json_file(SDXL_TURBO / "text_encoder" / "config.json"),
                                          dtype=dt)
        text_2 = CLIPTextModelWithProjection._from_config(
            CLIPTextConfig.from_json_file(SDXL_TURBO / "text_encoder_2" / "config.json"), dtype=dt)
    for part in (unet, vae, text, text_2):
        # plain nn.Module.to: diffusers' own .to(dtype=...) warns about "modules to keep in float32" (none here)
        torch.nn.Module.to(part, dtype=dt).eval().requires_grad_(False)
        keep_fp32_parts(part, dt)
    scheduler = EulerAncestralDiscreteScheduler.from_config(read_config(SDXL_TURBO / "scheduler" /
                                                                        "scheduler_config.json"))
    tokenizer = clip_tokenizer()
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def full_captioner(device, dtype, seed: int = 0):
    """BLIP-2 OPT-2.7b with random weights and a processor of its image size (224 px, 32 query tokens)."""
    from transformers import Blip2Config, Blip2Processor, BlipImageProcessor

    from popyou_cli.third_party.blip2 import build_tiny_captioner, captioner_from_config

    _, tiny = build_tiny_captioner()
    tok = tiny.tokenizer
    image_processor = BlipImageProcessor(**{k: v for k, v in read_config(BLIP2_OPT / "preprocessor_config.json")
                                            .items() if k != "image_processor_type"})
    cfg = Blip2Config.from_json_file(BLIP2_OPT / "config.json")
    processor = Blip2Processor(image_processor, tok, num_query_tokens=cfg.num_query_tokens)
    # the real ids would come with OPT's tokenizer; these make the tiny one's ids valid in the real-size model
    cfg.image_token_index = tok.convert_tokens_to_ids(str(processor.image_token))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(cfg.text_config, name, getattr(tok, name))
    return captioner_from_config(cfg, processor, device=device, dtype=dtype, seed=seed)


def full_siglip(device, seed: int = 0):
    """open_clip's ViT-B-16-SigLIP with random weights, in float32 like ``load_siglip``'s, its real image
    preprocessing (224 px, mean = std = 0.5) and a tokenizer of random ids of the right length."""
    import logging

    import open_clip

    from popyou_cli.core.devices import resolve_device

    dev = resolve_device(device)
    quiet = logging.Filter()
    quiet.filter = lambda record: "No pretrained weights" not in record.getMessage()  # random on purpose
    logging.root.addFilter(quiet)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net, _, preprocess = open_clip.create_model_and_transforms(
                DEFAULT_SIGLIP, pretrained=None, device=dev, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    finally:
        logging.root.removeFilter(quiet)
    vocab, ctx = net.vocab_size, net.context_length

    def tokenizer(texts):  # the real tokenizer is a download; random ids cost the model the same
        return torch.randint(0, vocab, (len(texts), ctx))

    return net.eval(), preprocess, tokenizer


def full_vqvae(device, seed: int = 0):
    """VAR's VQ-VAE (ch 160, 4096 codes, 256 px) with random weights, float32 (the encode stage runs it so)."""
    from popyou_cli.core.devices import resolve_device
    from popyou_cli.models.vqvae import VQVAE, VQVAEConfig

    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = VQVAE(VQVAEConfig())
    return vae.to(dev).eval()
