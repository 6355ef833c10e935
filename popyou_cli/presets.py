"""Named settings per stage: "full" (real Hub models and sizes, for a GPU) and "tiny" (seeded random stand-ins
built in code: offline, seconds on CPU, for tests and smoke runs).

Each stage has its own frozen dataclass and a dict of presets; CLI options default to None and fall back to the
chosen preset field by field (see `resolve`). Other stages add their dataclasses here the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, TypeVar

from .errors import PopyouError

PRESET_NAMES = ("full", "tiny")

T = TypeVar("T")


@dataclass(frozen=True)
class GenDataPreset:
    """Settings of `popyou gen-data`."""
    model: str  # diffusers text-to-image pipeline: Hub id, local folder, or "tiny"
    size: int  # height = width in pixels (a multiple of 8)
    steps: int  # denoising steps (SDXL-Turbo is trained for 1 to 4)
    guidance: float  # classifier-free guidance; SDXL-Turbo is trained without it (0)
    batch_size: int  # images per pipeline call
    shard_size: int  # rows per shard file: the unit of resume and of work split across processes
    dtype: str  # auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16
    image_format: str = "png"


GEN_DATA_PRESETS: dict[str, GenDataPreset] = {
    # The original recipe's model and size with Turbo's intended 1 step and no guidance. A shard of 1000 PNGs at
    # 512 px is about 400 MB: big enough for few files at 100k rows, small enough that a kill loses seconds.
    "full": GenDataPreset(model="stabilityai/sdxl-turbo", size=512, steps=1, guidance=0.0, batch_size=8,
                          shard_size=1000, dtype="auto"),
    # Small shards so that resume and multi-process splitting are exercised even on a few dozen rows.
    "tiny": GenDataPreset(model="tiny", size=64, steps=1, guidance=0.0, batch_size=8, shard_size=16, dtype="auto"),
}


def get_preset(presets: Mapping[str, T], name: str, *, stage: str) -> T:
    """The preset `name` of one stage, or a one-line error listing the known names."""
    try:
        return presets[name]
    except KeyError:
        raise PopyouError(f"{stage}: unknown preset '{name}' (use one of: {', '.join(presets)})") from None


def resolve(preset: T, **overrides: Any) -> T:
    """`preset` with every override that is not None applied (CLI options left out stay at the preset)."""
    names = {f.name for f in fields(preset)}  # type: ignore[arg-type]
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"not fields of {type(preset).__name__}: {sorted(unknown)}")
    return replace(preset, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[type-var]


@dataclass(frozen=True)
class FinetunePreset:
    """Settings of `popyou finetune` (stage 1: VAR learns the new class from the encoded data)."""
    var: str  # starting VAR: Hub id/file, local checkpoint, popyou model folder or "tiny"
    lr: float
    batch_size: int  # rows per process per micro-batch
    grad_accum: int
    max_steps: int
    warmup: float  # < 1: fraction of the steps; >= 1: steps
    schedule: str  # linear | cosine | constant after the warm-up
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float
    mixed_precision: str  # no | bf16 | fp16
    label_smoothing: float
    cond_drop: float  # class dropout for classifier-free guidance
    save_every: int
    keep_last: int
    sample_every: int
    log_every: int
    lora_rank: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str = "proj,fc1,fc2,ada_lin.1,word_embed,head"  # every Linear VAR calls as a module
    n_samples: int = 8  # images in each sample grid
    sample_cfg: float = 4.0
    sample_top_k: int = 900
    sample_top_p: float = 0.95


FINETUNE_PRESETS: dict[str, FinetunePreset] = {
    # The original stage 1: VAR-d16, lr 3e-4, batch 4 x accumulation 2, label smoothing 0.1, 8% warm-up then
    # linear decay, grad clip 1, fp16 (plus VAR's AdamW betas/decay groups); "tens of thousands of steps".
    "full": FinetunePreset(var="FoundationVision/var/var_d16.pth", lr=3e-4, batch_size=4, grad_accum=2,
                           max_steps=30000, warmup=0.08, schedule="linear", min_lr_ratio=0.0, weight_decay=0.05,
                           grad_clip=1.0, mixed_precision="fp16", label_smoothing=0.1, cond_drop=0.1,
                           save_every=1000, keep_last=3, sample_every=1000, log_every=20),
    # Seconds on a CPU: the tiny VAR, a few steps, a checkpoint and a grid mid-way.
    "tiny": FinetunePreset(var="tiny", lr=3e-3, batch_size=8, grad_accum=1, max_steps=20, warmup=0.1,
                           schedule="linear", min_lr_ratio=0.0, weight_decay=0.05, grad_clip=1.0,
                           mixed_precision="no", label_smoothing=0.0, cond_drop=0.1, save_every=10, keep_last=2,
                           sample_every=10, log_every=5, lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                           n_samples=4, sample_cfg=1.5, sample_top_k=16, sample_top_p=0.0),
}


@dataclass(frozen=True)
class AdapterPreset:
    """Settings of `popyou train-adapter` (stages 2 and 3: SigLIP embedding -> adapter -> VAR)."""
    lr: float
    batch_size: int
    grad_accum: int
    max_steps: int
    warmup: float
    schedule: str
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float
    mixed_precision: str
    label_smoothing: float
    cond_drop: float  # conditioning dropout: null class and zero delta together
    save_every: int
    keep_last: int
    sample_every: int
    log_every: int
    val_fraction: float  # rows held out for the right-vs-shuffled conditioning check
    hidden_dim: int = 0  # adapter hidden width; 0 = the VAR's width (the original's 1024 for d16)
    lora_rank: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str = "proj,fc1,fc2,ada_lin.1,word_embed,head"
    n_samples: int = 8
    sample_cfg: float = 1.5  # the original's sampling defaults: cfg 1.5, top-k 0, top-p 0.9
    sample_top_k: int = 0
    sample_top_p: float = 0.9


ADAPTER_PRESETS: dict[str, AdapterPreset] = {
    # The original stages 2/3: lr 1e-4, batch 4, 20k steps, CE without smoothing, optional LoRA r8/a32/d0.05.
    "full": AdapterPreset(lr=1e-4, batch_size=4, grad_accum=1, max_steps=20000, warmup=0.02, schedule="linear",
                          min_lr_ratio=0.0, weight_decay=0.05, grad_clip=1.0, mixed_precision="fp16",
                          label_smoothing=0.0, cond_drop=0.1, save_every=1000, keep_last=3, sample_every=1000,
                          log_every=20, val_fraction=0.02),
    "tiny": AdapterPreset(lr=3e-3, batch_size=8, grad_accum=1, max_steps=20, warmup=0.1, schedule="linear",
                          min_lr_ratio=0.0, weight_decay=0.0, grad_clip=1.0, mixed_precision="no",
                          label_smoothing=0.0, cond_drop=0.1, save_every=10, keep_last=2, sample_every=10,
                          log_every=5, val_fraction=0.2, lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                          n_samples=4, sample_top_k=16, sample_top_p=0.0),
}


@dataclass(frozen=True)
class CaptionPreset:
    """Settings of `popyou caption`."""
    model: str  # Blip2ForConditionalGeneration checkpoint: Hub id, local folder, or "tiny"
    prompt: str | None  # text the caption continues (e.g. "Question: what is this? Answer:"); None = plain caption
    max_new_tokens: int
    num_beams: int  # 1 = greedy search; more = beam search
    batch_size: int
    shard_size: int
    dtype: str  # auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16


CAPTION_PRESETS: dict[str, CaptionPreset] = {
    # BLIP-2 OPT-2.7b in fp16 is about 8 GB; 32 images a batch keeps an 80 GB GPU busy with room for beams.
    "full": CaptionPreset(model="Salesforce/blip2-opt-2.7b", prompt=None, max_new_tokens=30, num_beams=1,
                          batch_size=32, shard_size=1000, dtype="auto"),
    "tiny": CaptionPreset(model="tiny", prompt=None, max_new_tokens=8, num_beams=1, batch_size=8, shard_size=16,
                          dtype="auto"),
}


@dataclass(frozen=True)
class EncodePreset:
    """Settings of `popyou encode`."""
    siglip_model: str  # open_clip model name (or hf-hub: / local-dir:), or "tiny"
    siglip_pretrained: str | None  # open_clip pretrained tag or checkpoint file
    vqvae: str  # VQ-VAE weights spec (models/checkpoints.py), or "tiny"
    patch_nums: tuple[int, ...]  # VAR's scales; the last times 16 is the image size
    resize: int | None  # short side before the centre crop; None = 9/8 of the image size (288 for 256)
    batch_size: int
    shard_size: int
    embed_dtype: str  # float16 or float32: storage type of the SigLIP embeddings
    dtype: str  # SigLIP autocast: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16; the VQ-VAE runs in fp32


ENCODE_PRESETS: dict[str, EncodePreset] = {
    # The original recipe: SigLIP base (the weights of google/siglip-base-patch16-224) and VAR's 256 px VQ-VAE.
    "full": EncodePreset(siglip_model="ViT-B-16-SigLIP", siglip_pretrained="webli",
                         vqvae="FoundationVision/var/vae_ch160v4096z32.pth",
                         patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), resize=None, batch_size=64, shard_size=1000,
                         embed_dtype="float16", dtype="auto"),
    # 64 px: the tiny VQ-VAE's four scales (1, 2, 3, 4) at 16x downsampling; 72 -> 64 keeps the 9/8 ratio.
    "tiny": EncodePreset(siglip_model="tiny", siglip_pretrained=None, vqvae="tiny", patch_nums=(1, 2, 3, 4),
                         resize=None, batch_size=8, shard_size=16, embed_dtype="float16", dtype="auto"),
}
