"""Text to image: SDXL(-Turbo) through diffusers (the gen-data stage), and its tiny stand-in."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popyou_cli.core.errors import PopyouError
from popyou_cli.third_party.common import (
    CLIP_CONTEXT_LENGTH,
    _load_or_explain,
    _looks_like_path,
    cached_json,
    clip_tokenizer,
    filter_known_warnings,
    is_tiny,
    missing_from_cache,
    seeded,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

DEFAULT_TEXT_TO_IMAGE = "stabilityai/sdxl-turbo"
TINY_TEXT_TO_IMAGE_SEED = 1001  # seed of the tiny stand-in's random weights (each family has its own)
TINY_IMAGE_SIZE = 64  # default output size of the tiny SDXL pipeline (latents are 8x smaller)


def load_text_to_image(
    model: str = DEFAULT_TEXT_TO_IMAGE,
    *,
    device: Any = "cpu",
    dtype: Any = None,
    image_size: int = TINY_IMAGE_SIZE,
):
    """The text-to-image diffusers pipeline: ``"tiny"`` or a Hub id / local folder (default SDXL-Turbo).

    Call it as SDXL-Turbo is called: ``pipe(prompts, num_inference_steps=1, guidance_scale=0.0,
    generator=...)``. ``image_size`` only applies to ``"tiny"`` (the default height and width of its images; a
    multiple of 8). For real models in float16 the repo's fp16 weight variant is used when it has one (see
    :func:`text_to_image_variant`; `popyou download` fetches the same files). The progress bars are disabled (the
    stages show their own).
    """
    from popyou_cli.core.devices import resolve_device, resolve_dtype  # torch: imported on use (see the package docstring)

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, "data")
    filter_known_warnings()  # the fp16 VAE upcast's FutureWarning, tiny or real
    if is_tiny(model):
        return _tiny_text_to_image(int(image_size), dev, dt)

    import diffusers  # noqa: F401 - before quiet_loading (in _load_or_explain), so its bars go too

    variant = text_to_image_variant(model, dt)

    def load():
        from diffusers import AutoPipelineForText2Image

        try:
            from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401 - marks `dtype=` support
            dtype_kw = {"dtype": dt}
        except ImportError:
            dtype_kw = {"torch_dtype": dt}
        return AutoPipelineForText2Image.from_pretrained(model, variant=variant, **dtype_kw)

    pipe = _load_or_explain("text-to-image model", model, load, stage="gen-data",
                            missing=lambda: missing_from_cache(model, text_to_image_files(model, variant)))
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return pipe


FP16_VARIANT = "fp16"


def text_to_image_variant(model: str, dtype: "torch.dtype") -> str | None:
    """The weight variant a diffusers pipeline loads in ``dtype``: "fp16" in float16 when the model has fp16
    weights (SDXL-Turbo does: half the download and no fp32 copy in memory), else None (the plain weights).

    Where the files are is where we look: a local folder, else the Hub's file list, else (offline) the Hugging
    Face cache. No load is tried and caught: a broken fp16 file is an error, not a silent switch to fp32.
    """
    import torch

    if dtype != torch.float16:
        return None
    files = _model_files(model)
    return FP16_VARIANT if any(f".{FP16_VARIANT}." in Path(f).name for f in files) else None


def _model_files(model: str) -> list[str]:
    """Paths inside a diffusers model: of a local folder, of the Hub repo, or of its cached snapshot."""
    from popyou_cli.core import hub

    folder = Path(model).expanduser()
    if folder.is_dir():
        return [str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()]
    if _looks_like_path(model):
        return []  # not there: the load says so
    try:
        return hub.list_files(model).files
    except hub.HubOffline:
        snapshot = hub.cached_snapshot(model)
        return [str(f.relative_to(snapshot)) for f in snapshot.rglob("*") if f.is_file()] if snapshot else []


def text_to_image_files(model: str, variant: str | None) -> list[str | tuple[str, ...]]:
    """The files a diffusers pipeline needs, as far as the cache tells (model_index.json first, then per
    component its config and weights): what a "not in the cache" error names."""
    wanted: list[str | tuple[str, ...]] = ["model_index.json"]
    index = cached_json(model, "model_index.json") or {}
    infix = f".{variant}" if variant else ""
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[-1] is None:
            continue
        cls = str(spec[-1])
        if "Tokenizer" in cls:
            wanted.append(f"{name}/tokenizer_config.json")
        elif "Scheduler" in cls:
            wanted.append(f"{name}/scheduler_config.json")
        else:
            wanted.append(f"{name}/config.json")
            wanted.append(tuple(f"{name}/{stem}{infix}.safetensors" if not index_file else
                                f"{name}/{stem}.safetensors.index{infix}.json"
                                for stem in ("diffusion_pytorch_model", "model") for index_file in (False, True)))
    return wanted


@functools.lru_cache(maxsize=8)
def _tiny_text_to_image(image_size: int, device: "torch.device", dtype: "torch.dtype"):
    import torch

    pipe = build_tiny_text_to_image(image_size)
    # plain nn.Module.to: diffusers' own .to(dtype=...) warns about "modules to keep in float32" (there are none)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            torch.nn.Module.to(component, device=device, dtype=dtype)
    return pipe


def build_tiny_text_to_image(image_size: int = TINY_IMAGE_SIZE, *, seed: int = TINY_TEXT_TO_IMAGE_SEED):
    """Build (uncached, on CPU, float32) the tiny SDXL pipeline with seeded random weights.

    Same classes as SDXL-Turbo: UNet2DConditionModel with SDXL's text_time conditioning, an AutoencoderKL with
    vae_scale_factor 8, CLIPTextModel + CLIPTextModelWithProjection and the trailing Euler-ancestral scheduler.
    """
    if image_size % 8 or image_size < 8:
        raise PopyouError(f"tiny text-to-image size must be a positive multiple of 8, got {image_size}")
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer()
    with seeded(seed):  # the draws in this order: unet, vae, then the two text encoders
        unet = _tiny_unet(image_size)
        vae = _tiny_vae(image_size)
        text_config = _tiny_clip_text_config(tokenizer)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=_turbo_scheduler())
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_TINY_TEXT_WIDTH, _TINY_TIME_EMBED_DIM = 32, 8


def _tiny_unet(image_size: int):
    """SDXL's UNet layout in miniature: two levels, cross-attention on the lower one, text_time conditioning."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=image_size // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=2 * _TINY_TEXT_WIDTH,  # the two encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=_TINY_TIME_EMBED_DIM,
        # 6 micro-conditioning numbers (original size, crop, target size) + the pooled text embedding
        projection_class_embeddings_input_dim=6 * _TINY_TIME_EMBED_DIM + _TINY_TEXT_WIDTH,
        norm_num_groups=32,
    )


def _tiny_vae(image_size: int):
    """An AutoencoderKL with SDXL's 4 levels (vae_scale_factor 8) and 4 latent channels, narrow."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
    )


def _tiny_clip_text_config(tokenizer) -> dict:
    """The CLIPTextConfig fields of both tiny text encoders (the second adds its projection)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=_TINY_TEXT_WIDTH,
        intermediate_size=2 * _TINY_TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_CONTEXT_LENGTH,
        projection_dim=_TINY_TEXT_WIDTH,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _turbo_scheduler():
    """SDXL-Turbo's scheduler: Euler ancestral with trailing timesteps (one step lands on t = 999)."""
    from diffusers import EulerAncestralDiscreteScheduler

    return EulerAncestralDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,
    )
