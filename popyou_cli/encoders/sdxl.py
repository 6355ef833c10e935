"""Text to image: SDXL(-Turbo) through diffusers (the gen-data stage), and its tiny stand-in."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from ..errors import PopyouError
from .common import (CLIP_CONTEXT_LENGTH, _load_or_explain, clip_tokenizer, is_tiny, resolve_device, resolve_dtype,
                     seeded)

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
    multiple of 8). For real models the fp16 weight variant is used on CUDA in float16 when the repo has one.
    The progress bar is disabled (the stages show their own).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if is_tiny(model):
        return _tiny_text_to_image(int(image_size), dev, dt)

    def load():
        import torch
        from diffusers import AutoPipelineForText2Image

        try:
            from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401 - marks `dtype=` support
            dtype_kw = {"dtype": dt}
        except ImportError:
            dtype_kw = {"torch_dtype": dt}
        if dev.type == "cuda" and dt == torch.float16:
            try:
                return AutoPipelineForText2Image.from_pretrained(model, variant="fp16", **dtype_kw)
            except Exception:  # noqa: BLE001 - no fp16 variant (or not cached): try the plain weights
                pass
        return AutoPipelineForText2Image.from_pretrained(model, **dtype_kw)

    pipe = _load_or_explain("text-to-image model", model, load)
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer()
    text_width, time_embed_dim = 32, 8
    with seeded(seed):
        unet = UNet2DConditionModel(
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
            cross_attention_dim=2 * text_width,  # the two encoders' hidden states, concatenated
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            # 6 micro-conditioning numbers (original size, crop, target size) + the pooled text embedding
            projection_class_embeddings_input_dim=6 * time_embed_dim + text_width,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
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
        text_config = dict(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_CONTEXT_LENGTH,
            projection_dim=text_width,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    scheduler = EulerAncestralDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
