"""The data-stage commands (gen-data, caption, encode): parse options and call one stage function.

cli/app.py registers these functions on the `popyou` app, in pipeline order. Spellings shared with every other
command (--data, --vae, --hflip, --image-size, --dtype, --workers, --prompt-file): docs/cli.md "One spelling per concept".
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from popyou_cli.cli.common import (PRESETS, choice_option, console, device_option, dtype_option, int_list,
                                   progress_every_option, user_errors)
from popyou_cli.core.errors import PopyouError
from popyou_cli.core.progress import set_progress_every

# Options shared by the data stages (gen-data, caption, encode), in panels by purpose. Short help here; docs/cli.md
# has every option in full.
P_DATA, P_MODEL, P_IMAGES, P_SPEED, P_PROGRESS = "Data", "Model", "Images", "Speed", "Progress"
_D_SHARD = typer.Option(None, "--shard-size", show_default=False, rich_help_panel=P_DATA, help="Rows per shard file, "
                        "the unit of resume. Default: full 1000, tiny 16.")
_D_IMAGE_COL = typer.Option("image", "--image-column", rich_help_panel=P_DATA, help="Column holding the images.")
_D_DEVICE = device_option(P_SPEED, help="auto: accelerate's device for this process; cpu, cuda or cuda:N.")
_D_DTYPE = dtype_option("auto: fp16 on CUDA, fp32 on CPU.", default=None, show_default=False)
_D_WORKERS = typer.Option(None, "--workers", show_default=False, rich_help_panel=P_SPEED, help="Helpers beside the "
                          "model (0: none). Default: min(4, CPUs).")
_D_NO_PROGRESS = typer.Option(False, "--no-progress", rich_help_panel=P_PROGRESS, help="No progress at all, only "
                              "the summary line.")
_D_PROGRESS = progress_every_option()
_D_OVERWRITE = typer.Option(False, "--overwrite", rich_help_panel=P_DATA, help="Replace a folder holding another "
                            "run of this stage.")


def _data_option(help: str):
    return typer.Option(None, "--data", metavar="DIR", show_default=False, rich_help_panel=P_DATA, help=help)


def _out_option(help: str):
    return typer.Option(..., "--out", metavar="DIR", rich_help_panel=P_DATA, help=help)


def _preset_option(help: str):
    return choice_option("full", "--preset", choices=PRESETS, rich_help_panel=P_MODEL, help=help)


def _batch_option(help: str):
    return typer.Option(None, "--batch-size", show_default=False, rich_help_panel=P_SPEED, help=help)


def _input(data: Optional[Path], stage: str) -> Path:
    if data is None:
        raise PopyouError(f"{stage} needs its input: --data DATASET (e.g. popyou {stage} --data data/funko --out ...)")
    return data


@user_errors
def gen_data_cmd(
    n: int = typer.Option(..., "--n", "-n", rich_help_panel=P_DATA, help="Rows wanted in all; more on a finished "
                          "folder makes only the new ones."),
    out: Path = _out_option("Dataset folder; rerun the command to resume."),
    seed: int = typer.Option(0, "--seed", rich_help_panel=P_DATA, help="Row i depends only on (seed, i)."),
    shard_size: Optional[int] = _D_SHARD,
    overwrite: bool = _D_OVERWRITE,
    preset: str = _preset_option("full: SDXL-Turbo, 512 px (GPU); tiny: offline stand-in, 64 px."),
    model: Optional[str] = typer.Option(None, "--model", show_default=False, rich_help_panel=P_MODEL,
                                        help="diffusers pipeline: Hub id, folder or 'tiny'. Default: the preset's."),
    image_size: Optional[int] = typer.Option(None, "--image-size", show_default=False, rich_help_panel=P_IMAGES,
                                             help="Pixels, a multiple of 8. Default: full 512, tiny 64."),
    steps: Optional[int] = typer.Option(None, "--steps", show_default=False, rich_help_panel=P_IMAGES,
                                        help="Denoising steps. Default: 1."),
    guidance: Optional[float] = typer.Option(None, "--guidance", show_default=False, rich_help_panel=P_IMAGES,
                                             help="Guidance scale. Default: 0 (SDXL-Turbo's)."),
    image_format: Optional[str] = choice_option(None, "--format", choices=("png", "jpeg", "webp"),
                                                show_default=False, rich_help_panel=P_IMAGES,
                                                help="Default: png (lossless)."),
    quality: Optional[int] = typer.Option(None, "--quality", show_default=False, rich_help_panel=P_IMAGES,
                                          help="jpeg/webp quality 1-100. Default: 95 / 90."),
    attributes: Optional[Path] = typer.Option(None, "--attributes", metavar="FILE", show_default=False,
                                              rich_help_panel=P_IMAGES, help="YAML/JSON prompt scheme. Default: "
                                              "the built-in one."),
    device: str = _D_DEVICE,
    dtype: Optional[str] = _D_DTYPE,
    batch_size: Optional[int] = _batch_option("Images per call; a resume must use the same. Default: 8."),
    workers: Optional[int] = typer.Option(None, "--workers", show_default=False, rich_help_panel=P_SPEED,
                                          help="Encoding threads (0: none). Default: CPUs - 1, at most 8."),
    no_progress: bool = _D_NO_PROGRESS,
    progress_every: Optional[float] = _D_PROGRESS,
):
    """Generate the synthetic Funko Pop! data set.

    Resumable; several GPUs with `accelerate launch --num_processes 8 -- $(which popyou) gen-data ...` (note the
    --). Example: popyou gen-data --n 100000 --preset full --batch-size 16 --dtype fp16 --out data/funko"""
    from popyou_cli.data.gen_data import gen_data

    set_progress_every(progress_every)
    res = gen_data(out=out, n=n, preset=preset, model=model, seed=seed, batch_size=batch_size,
                   shard_size=shard_size, size=image_size, steps=steps, guidance=guidance, image_format=image_format,
                   quality=quality, prompt_file=attributes, device=device, dtype=dtype, overwrite=overwrite,
                   workers=workers, progress=not no_progress, console=console)
    if res.is_main_process:
        console.print(res.summary(), highlight=False, soft_wrap=True)


@user_errors
def caption_cmd(
    data: Optional[Path] = _data_option("A gen-data folder, any save_to_disk dataset, a folder of your own "
                                        "pictures or a Hub dataset (converted once into OUT/../NAME-images)."),
    out: Path = _out_option("Output folder (joins --data); rerun to resume."),
    image_column: str = _D_IMAGE_COL,
    shard_size: Optional[int] = _D_SHARD,
    overwrite: bool = _D_OVERWRITE,
    preset: str = _preset_option("full: BLIP-2 OPT-2.7b (GPU); tiny: offline stand-in."),
    model: Optional[str] = typer.Option(None, "--model", show_default=False, rich_help_panel=P_MODEL,
                                        help="A BLIP-2 checkpoint: Hub id, folder or 'tiny'."),
    caption_prefix: Optional[str] = typer.Option(None, "--caption-prefix", show_default=False,
                                                 rich_help_panel=P_MODEL, help="Text the caption continues; only "
                                                 "the continuation is stored."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", show_default=False,
                                                 rich_help_panel=P_MODEL, help="Longest caption. Default: full 30, "
                                                 "tiny 8."),
    num_beams: Optional[int] = typer.Option(None, "--num-beams", show_default=False, rich_help_panel=P_MODEL,
                                            help="1: greedy; N: beam search. Default: 1."),
    device: str = _D_DEVICE,
    dtype: Optional[str] = _D_DTYPE,
    batch_size: Optional[int] = _batch_option("Images per call. Default: full 32, tiny 8."),
    workers: Optional[int] = _D_WORKERS,
    no_progress: bool = _D_NO_PROGRESS,
    progress_every: Optional[float] = _D_PROGRESS,
):
    """Caption every image with BLIP-2.

    Unreadable images keep their row (caption "", the reason in caption_error). Resumable; several GPUs with
    `accelerate launch --num_processes 8 -m popyou_cli caption ...`. Example:
    popyou caption --data data/funko --out data/funko-cap --preset full --batch-size 64"""
    from popyou_cli.data.caption import caption

    set_progress_every(progress_every)
    data = _input(data, "caption")
    res = caption(dataset=data, out=out, preset=preset, model=model, prompt=caption_prefix, max_new_tokens=max_new_tokens,
                  num_beams=num_beams, batch_size=batch_size, shard_size=shard_size, image_column=image_column,
                  device=device, dtype=dtype, workers=workers, overwrite=overwrite, progress=not no_progress,
                  console=console)
    if res.is_main_process:
        console.print(res.summary(), highlight=False, soft_wrap=True)


@user_errors
def encode_cmd(
    data: Optional[Path] = _data_option("Usually a caption folder; or anything caption takes (a folder of "
                                        "pictures, a Hub dataset)."),
    out: Path = _out_option("Output folder (joins --data); rerun to resume."),
    image_column: str = _D_IMAGE_COL,
    shard_size: Optional[int] = _D_SHARD,
    overwrite: bool = _D_OVERWRITE,
    preset: str = _preset_option("full: ViT-B-16-SigLIP + VAR's VQ-VAE; tiny: stand-ins."),
    siglip_model: Optional[str] = typer.Option(None, "--siglip-model", show_default=False, rich_help_panel=P_MODEL,
                                               help="open_clip name, hf-hub:REPO, local-dir:DIR or 'tiny'."),
    siglip_pretrained: Optional[str] = typer.Option(None, "--siglip-pretrained", show_default=False,
                                                    rich_help_panel=P_MODEL, help="Pretrained tag or checkpoint "
                                                    "file. Default: webli."),
    vae: Optional[str] = typer.Option(None, "--vae", metavar="SPEC", show_default=False, rich_help_panel=P_MODEL,
                                      help="VQ-VAE weights. Default: VAR's vae_ch160v4096z32."),
    patch_nums: Optional[str] = typer.Option(None, "--patch-nums", show_default=False, rich_help_panel=P_IMAGES,
                                             help="VAR scales, comma-separated. Default: VAR's (tiny 1,2,3,4)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", show_default=False, rich_help_panel=P_IMAGES,
                                             help="Crop size: the last patch_num x 16."),
    resize: Optional[int] = typer.Option(None, "--resize", show_default=False, rich_help_panel=P_IMAGES,
                                         help="Short side before the crop. Default: 9/8 of it."),
    hflip: bool = typer.Option(False, "--hflip", rich_help_panel=P_IMAGES, help="Also store the codes of the "
                               "mirrored crop."),
    text_column: Optional[list[str]] = typer.Option(None, "--text-column", metavar="COL", show_default=False,
                                                    rich_help_panel=P_DATA, help="Text to embed; repeatable. "
                                                    "Default: prompt, caption."),
    no_text: bool = typer.Option(False, "--no-text", rich_help_panel=P_DATA, help="Embed no text column."),
    embed_dtype: Optional[str] = choice_option(None, "--embed-dtype", choices=("fp16", "fp32"), show_default=False,
                                               rich_help_panel=P_DATA, help="Embedding storage. Default: fp16."),
    device: str = _D_DEVICE,
    dtype: Optional[str] = dtype_option("SigLIP autocast; auto: fp16 on CUDA.", default=None, show_default=False),
    batch_size: Optional[int] = _batch_option("Images per call. Default: full 64, tiny 8."),
    workers: Optional[int] = _D_WORKERS,
    no_progress: bool = _D_NO_PROGRESS,
    progress_every: Optional[float] = _D_PROGRESS,
):
    """VQ-VAE codes and SigLIP embeddings of every row, once for training.

    Unreadable images keep their row (placeholders, the reason in encode_error). Resumable; several GPUs with
    `accelerate launch --num_processes 8 -m popyou_cli encode ...`. Example:
    popyou encode --data data/funko-cap --out data/funko-enc --preset full --hflip"""
    from popyou_cli.data.encode import encode

    set_progress_every(progress_every)
    data = _input(data, "encode")
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
