"""The data-stage commands (gen-data, caption, encode): parse options and call one stage function.

cli.py registers these functions on the `popyou` app, in pipeline order. Spellings shared with every other
command (--data, --vae, --hflip, --image-size, --dtype, --workers, --prompt-file): README "One spelling per concept".
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from popyou_cli.cli.common import (choice_option, console, hidden_alias, int_list,
                         progress_every_option, renamed, user_errors)
from popyou_cli.core.errors import PopyouError
from popyou_cli.core.presets import DTYPE_ALIASES, DTYPES, PRESET_NAMES as PRESETS
from popyou_cli.core.progress import set_progress_every

# Options shared by the data stages (gen-data, caption, encode).
_D_SHARD = typer.Option(None, "--shard-size", help="Rows per shard file: the unit of resume and of the split across processes. Default: full 1000, tiny 16.", show_default=False)
_D_IMAGE_COL = typer.Option("image", "--image-column", help="Column holding the images (datasets Image, bytes or file paths).")
_D_DEVICE = typer.Option("auto", "--device", help="auto (accelerate's per-process device: cuda:LOCAL_RANK or cpu), cpu, cuda or cuda:N.")
_D_DTYPE = choice_option(None, "--dtype", choices=DTYPES, aliases=DTYPE_ALIASES, show_default=False, help="Model precision: auto (fp16 on CUDA, fp32 on CPU), fp32, bf16 or fp16; float32, float16, half and bfloat16 are accepted too. Default: auto.")
_D_WORKERS = typer.Option(None, "--workers", help="Processes (gen-data: threads) preparing rows beside the model; 0 = all in the main process. Default: caption, encode min(4, CPUs); gen-data CPUs - 1, at most 8.", show_default=False)
_D_NO_PROGRESS = typer.Option(False, "--no-progress", help="No progress at all (neither the live bar nor the log lines); only the final summary line.")
_D_PROGRESS = progress_every_option()
_D_DATA = typer.Option(None, "--data", help="Input dataset folder with an image column (required).", show_default=False)
_D_OLD_DATA = typer.Argument(None, hidden=True, help="Deprecated: use --data.", show_default=False)


def _input(data: Optional[Path], positional: Optional[Path], stage: str) -> Path:
    data = renamed(data, positional, new_flag="--data DATASET", old_flag=f"'popyou {stage} DATASET' (positional)")
    if data is None:
        raise PopyouError(f"{stage} needs its input: --data DATASET (e.g. popyou {stage} --data data/funko --out ...)")
    return data


@user_errors
def gen_data_cmd(
    n: int = typer.Option(..., "--n", "-n", help="Rows wanted in all: row i is prompt i and its image. A larger --n on a finished folder makes only the missing rows. Under torchrun/accelerate launch put '--' before the script, or write -n: their parsers take --n for one of their own options."),
    out: Path = typer.Option(..., "--out", help="Dataset folder (created; rerun the same command to resume after a crash or kill)."),
    preset: str = choice_option("full", "--preset", choices=PRESETS, help="full: SDXL-Turbo, 512 px, 1 step, guidance 0 (GPU). tiny: offline random stand-in, 64 px, small shards (CPU, tests)."),
    model: Optional[str] = typer.Option(None, "--model", help="diffusers text-to-image pipeline: Hub id, local folder or 'tiny'. Default: from the preset.", show_default=False),
    seed: int = typer.Option(0, "--seed", help="Data set seed: prompt i and image i depend only on (seed, i)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per pipeline call; recorded, since it changes rounding: a resume must use the same. Default: 8.", show_default=False),
    shard_size: Optional[int] = _D_SHARD,
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Image height and width in pixels, a multiple of 8. Default: full 512, tiny 64.", show_default=False),
    size_old: Optional[int] = hidden_alias(None, "--size", "--image-size"),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps. Default: 1.", show_default=False),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale; SDXL-Turbo uses 0. Default: 0.", show_default=False),
    image_format: Optional[str] = choice_option(None, "--format", choices=("png", "jpeg", "webp"), show_default=False, help="png (lossless), jpeg or webp. Default: png."),
    quality: Optional[int] = typer.Option(None, "--quality", help="jpeg/webp quality 1-100. Default: jpeg 95, webp 90.", show_default=False),
    attributes: Optional[Path] = typer.Option(None, "--attributes", help="YAML/JSON attribute file changing the prompt scheme (format: popyou_cli/data/prompt_scheme.py). Default: the built-in scheme.", show_default=False),
    attributes_old: Optional[Path] = hidden_alias(None, "--prompt-file", "--attributes"),
    device: str = _D_DEVICE,
    dtype: Optional[str] = _D_DTYPE,
    workers: Optional[int] = _D_WORKERS,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a folder that holds a different gen-data run."),
    no_progress: bool = _D_NO_PROGRESS,
    progress_every: Optional[float] = _D_PROGRESS,
):
    """Generate the synthetic Funko Pop! data set. Resumable; spread over GPUs with
    `accelerate launch --num_processes 8 -- $(which popyou) gen-data ...` (note the --). Example:
    popyou gen-data --n 100000 --preset full --batch-size 16 --dtype fp16 --out data/funko"""
    from popyou_cli.data.gen_data import gen_data

    set_progress_every(progress_every)
    image_size = renamed(image_size, size_old, new_flag="--image-size", old_flag="--size")
    attributes = renamed(attributes, attributes_old, new_flag="--attributes", old_flag="gen-data --prompt-file")
    res = gen_data(out=out, n=n, preset=preset, model=model, seed=seed, batch_size=batch_size,
                   shard_size=shard_size, size=image_size, steps=steps, guidance=guidance, image_format=image_format,
                   quality=quality, prompt_file=attributes, device=device, dtype=dtype, overwrite=overwrite,
                   workers=workers, progress=not no_progress, console=console)
    if res.is_main_process:
        console.print(res.summary(), highlight=False, soft_wrap=True)


@user_errors
def caption_cmd(
    dataset: Optional[Path] = _D_OLD_DATA,
    data: Optional[Path] = typer.Option(None, "--data", help="Input dataset folder with an image column (required): a gen-data folder (or a later stage of it), or any datasets.save_to_disk folder such as a saved imagefolder.", show_default=False),
    out: Path = typer.Option(..., "--out", help="Output folder: index, caption, caption_error (joins --data, images are not copied). Rerun the same command to resume."),
    preset: str = choice_option("full", "--preset", choices=PRESETS, help="full: BLIP-2 OPT-2.7b, fp16 on GPU. tiny: offline random stand-in (CPU, tests)."),
    model: Optional[str] = typer.Option(None, "--model", help="Any Blip2ForConditionalGeneration checkpoint: Hub id or local folder, or 'tiny'. Default: from the preset.", show_default=False),
    caption_prefix: Optional[str] = typer.Option(None, "--caption-prefix", help="Text the caption continues, e.g. 'Question: what does this figure wear? Answer:'; stored captions hold only the continuation. Default: none.", show_default=False),
    prompt_old: Optional[str] = hidden_alias(None, "--prompt", "--caption-prefix"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Longest caption in tokens. Default: full 30, tiny 8.", show_default=False),
    num_beams: Optional[int] = typer.Option(None, "--num-beams", help="1 = greedy search; N > 1 = beam search with N beams. Default: 1.", show_default=False),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per generate call. Default: full 32, tiny 8.", show_default=False),
    shard_size: Optional[int] = _D_SHARD,
    image_column: str = _D_IMAGE_COL,
    device: str = _D_DEVICE,
    dtype: Optional[str] = _D_DTYPE,
    workers: Optional[int] = _D_WORKERS,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a folder that holds a different caption run."),
    no_progress: bool = _D_NO_PROGRESS,
    progress_every: Optional[float] = _D_PROGRESS,
):
    """Caption every image with BLIP-2. Unreadable images keep their row (caption "", reason in caption_error).
    Resumable; several GPUs with `accelerate launch --num_processes 8 -m popyou_cli caption ...`. Example:
    popyou caption --data data/funko --out data/funko-cap --preset full --batch-size 64"""
    from popyou_cli.data.caption import caption

    set_progress_every(progress_every)
    data = _input(data, dataset, "caption")
    prefix = renamed(caption_prefix, prompt_old, new_flag="--caption-prefix", old_flag="caption --prompt")
    res = caption(dataset=data, out=out, preset=preset, model=model, prompt=prefix, max_new_tokens=max_new_tokens,
                  num_beams=num_beams, batch_size=batch_size, shard_size=shard_size, image_column=image_column,
                  device=device, dtype=dtype, workers=workers, overwrite=overwrite, progress=not no_progress,
                  console=console)
    if res.is_main_process:
        console.print(res.summary(), highlight=False, soft_wrap=True)


@user_errors
def encode_cmd(
    dataset: Optional[Path] = _D_OLD_DATA,
    data: Optional[Path] = typer.Option(None, "--data", help="Input dataset folder with an image column (required), usually a caption folder, which brings prompt and caption along.", show_default=False),
    out: Path = typer.Option(..., "--out", help="Output folder: index, codes, codes_flip (with --hflip), siglip_image, siglip_text_<column>, encode_error. Rerun the same command to resume."),
    preset: str = choice_option("full", "--preset", choices=PRESETS, help="full: ViT-B-16-SigLIP (webli) and VAR's 256 px VQ-VAE. tiny: offline random stand-ins, 64 px (CPU, tests)."),
    siglip_model: Optional[str] = typer.Option(None, "--siglip-model", help="open_clip model name (any of open_clip.list_models()), hf-hub:ORG/REPO, local-dir:FOLDER, or 'tiny'. Default: from the preset.", show_default=False),
    siglip_pretrained: Optional[str] = typer.Option(None, "--siglip-pretrained", help="open_clip pretrained tag or checkpoint file. Default: webli for the preset model, else the model's only tag.", show_default=False),
    vae: Optional[str] = typer.Option(None, "--vae", help="VQ-VAE weights: Hub file, local .pth/.safetensors, a popyou VQ-VAE folder, a popyou model folder (its recorded VQ-VAE) or 'tiny'. Default: FoundationVision/var/vae_ch160v4096z32.pth (tiny: tiny).", show_default=False),
    vqvae_old: Optional[str] = hidden_alias(None, "--vqvae", "--vae"),
    patch_nums: Optional[str] = typer.Option(None, "--patch-nums", help="VAR scales, comma-separated. Default: 1,2,3,4,5,6,8,10,13,16 (tiny: 1,2,3,4).", show_default=False),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Crop size: 256 or 512 pick the official patch_nums; must equal the last patch_num x 16. Default: from the patch_nums.", show_default=False),
    resize: Optional[int] = typer.Option(None, "--resize", help="Short side after the Lanczos resize, before the centre crop. Default: 9/8 of the crop (288 for 256, 576 for 512, 72 for 64).", show_default=False),
    text_column: Optional[list[str]] = typer.Option(None, "--text-column", help="Text column to embed as siglip_text_<column>; repeat for several. Default: prompt and caption, those present.", show_default=False),
    no_text: bool = typer.Option(False, "--no-text", help="Embed no text column."),
    hflip: bool = typer.Option(False, "--hflip", help="Also store codes_flip: the codes of the horizontally mirrored crop, which training's --hflip uses."),
    flip_old: bool = hidden_alias(False, "--flip", "--hflip"),
    embed_dtype: Optional[str] = choice_option(None, "--embed-dtype", choices=("fp16", "fp32"), aliases={"float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}, show_default=False, help="Storage of the embeddings: fp16 or fp32 (float16, float32 accepted too). Default: fp16."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per model call. Default: full 64, tiny 8.", show_default=False),
    shard_size: Optional[int] = _D_SHARD,
    image_column: str = _D_IMAGE_COL,
    device: str = _D_DEVICE,
    dtype: Optional[str] = choice_option(None, "--dtype", choices=DTYPES, aliases=DTYPE_ALIASES, show_default=False, help="SigLIP autocast: auto (fp16 on CUDA, fp32 on CPU), fp32, bf16 or fp16 (aliases accepted). The VQ-VAE always runs in fp32. Default: auto."),
    workers: Optional[int] = _D_WORKERS,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a folder that holds a different encode run."),
    no_progress: bool = _D_NO_PROGRESS,
    progress_every: Optional[float] = _D_PROGRESS,
):
    """VAR codes (VQ-VAE) and SigLIP image/text embeddings of every row, computed once for training. Unreadable
    images keep their row (placeholders, reason in encode_error). Resumable; several GPUs with
    `accelerate launch --num_processes 8 -m popyou_cli encode ...`. Example:
    popyou encode --data data/funko-cap --out data/funko-enc --preset full --hflip"""
    from popyou_cli.data.encode import encode

    set_progress_every(progress_every)
    data = _input(data, dataset, "encode")
    vae = renamed(vae, vqvae_old, new_flag="--vae", old_flag="encode --vqvae")
    hflip = renamed(hflip, flip_old, new_flag="--hflip", old_flag="encode --flip", unset=False)
    if no_text and text_column:
        raise PopyouError("--no-text and --text-column exclude each other")
    texts = [] if no_text else (list(text_column) if text_column else None)
    storage = {"fp16": "float16", "fp32": "float32"}.get(embed_dtype, embed_dtype)  # the names datasets uses
    res = encode(dataset=data, out=out, preset=preset, siglip_model=siglip_model,
                 siglip_pretrained=siglip_pretrained, vqvae=vae, patch_nums=int_list(patch_nums, "--patch-nums"),
                 image_size=image_size, resize=resize, text_columns=texts, flip=hflip, embed_dtype=storage,
                 batch_size=batch_size, shard_size=shard_size, image_column=image_column, device=device,
                 dtype=dtype, workers=workers, overwrite=overwrite, progress=not no_progress, console=console)
    if res.is_main_process:
        console.print(res.summary(), highlight=False, soft_wrap=True)
