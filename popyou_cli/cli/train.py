"""The training commands (finetune, train-adapter): parse options and call one stage function.

cli.py registers these functions on the `popyou` app, in pipeline order."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from popyou_cli.cli.common import (choice_option, console, hidden_alias, progress_every_option,
                         renamed, user_errors)
from popyou_cli.core.errors import PopyouError
from popyou_cli.core.presets import DTYPE_ALIASES, DTYPES, PRESET_NAMES as PRESETS
from popyou_cli.core.progress import set_progress_every

# Help panels of the training options.
P_DATA, P_MODEL, P_OPT, P_LORA, P_CKPT, P_LOG = "Data", "Model", "Optimisation", "LoRA", "Checkpoints and Hub", "Logging"

# Options shared by both training commands; None means "the preset's value" (shown in brackets).
_T_PRESET = choice_option("full", "--preset", choices=PRESETS, help="full: the original recipe's hyper-parameters for a GPU (fp16). tiny: the tiny stand-ins, a few steps on a CPU (tests, smoke runs).", rich_help_panel=P_DATA)
_T_LR = typer.Option(None, "--lr", help="Peak learning rate of AdamW (betas 0.9/0.95; no weight decay on biases, norms, positions, as VAR) [preset: finetune 3e-4, adapter 1e-4].", rich_help_panel=P_OPT)
_T_BS = typer.Option(None, "--batch-size", help="Rows per process per micro-batch; the effective batch is batch x accumulation x processes [preset: 4].", rich_help_panel=P_OPT)
_T_ACCUM = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step [preset: finetune 2, adapter 1].", rich_help_panel=P_OPT)
_T_STEPS = typer.Option(None, "--max-steps", help="Optimizer steps to train [preset: finetune 30000, adapter 20000].", rich_help_panel=P_OPT)
_T_EPOCHS = typer.Option(None, "--epochs", help="Train this many passes over the data instead of --max-steps (may be fractional).", rich_help_panel=P_OPT)
_T_WARMUP = typer.Option(None, "--warmup", help="Linear warm-up: a fraction of the steps if < 1, else a number of steps [preset: finetune 0.08].", rich_help_panel=P_OPT)
_T_SCHED = choice_option(None, "--schedule", choices=("linear", "cosine", "constant"), show_default=False, help="After the warm-up: linear or cosine decay to lr x --min-lr-ratio, or constant [preset: linear].", rich_help_panel=P_OPT)
_T_MINLR = typer.Option(None, "--min-lr-ratio", help="Where the decay ends, as a fraction of --lr [preset: 0].", rich_help_panel=P_OPT)
_T_WD = typer.Option(None, "--weight-decay", help="AdamW weight decay on weight matrices [preset: 0.05, VAR's].", rich_help_panel=P_OPT)
_T_CLIP = typer.Option(None, "--grad-clip", help="Clip the gradient norm to this (0 = off) [preset: 1].", rich_help_panel=P_OPT)
_T_DTYPE = choice_option(None, "--dtype", choices=DTYPES, aliases={**DTYPE_ALIASES, "no": "fp32"}, show_default=False, rich_help_panel=P_OPT, help="Mixed precision: fp32 (none), bf16 or fp16 (fp16 uses a loss scaler and needs CUDA); auto: bf16 on a GPU that has it, else fp16, fp32 on CPU. float32/float16/bfloat16 accepted too [preset: full fp16, tiny fp32].")
_T_OLD_MP = hidden_alias(None, "--mixed-precision", "--dtype")
_T_LS = typer.Option(None, "--label-smoothing", help="Label smoothing of the cross-entropy [preset: finetune 0.1, adapter 0].", rich_help_panel=P_OPT)
_T_SW = typer.Option(None, "--scale-weights", help="Comma-separated loss weight per scale, e.g. 2,2,1,1,1,1,1,1,1,1 (default: every token counts the same, as VAR).", rich_help_panel=P_OPT)
_T_DROP = typer.Option(None, "--cond-drop", help="Probability that a row trains with the null class (and no delta): makes classifier-free guidance possible [preset: 0.1].", rich_help_panel=P_OPT)
_T_HFLIP = typer.Option(None, "--hflip/--no-hflip", help="Use the stored codes of the mirrored image (codes_flip) for a random half of the rows, when the data has them [preset: on].", show_default=False, rich_help_panel=P_DATA)
_T_SAVE = typer.Option(None, "--save-every", help="Write a checkpoint every N steps (always at the end) [preset: full 1000].", rich_help_panel=P_CKPT)
_T_KEEP = typer.Option(None, "--keep-last", help="Checkpoints kept in OUT/checkpoints (older ones are deleted) [preset: full 3].", rich_help_panel=P_CKPT)
_T_SAMPLE = typer.Option(None, "--sample-every", help="Write a sample grid OUT/samples/step-N.png every N steps at fixed seeds (always at the end) [preset: full 1000].", rich_help_panel=P_LOG)
_T_NSAMP = typer.Option(None, "--n-samples", help="Images per sample grid (0 = no grids) [preset: full 8].", rich_help_panel=P_LOG)
_T_SCFG = typer.Option(None, "--sample-cfg", help="Guidance of the sample grids; train-adapter also stores it as the pipeline's default [preset: finetune full 4, else 1.5].", rich_help_panel=P_LOG)
_T_STOPK = typer.Option(None, "--sample-top-k", help="Top-k of the sample grids (0 = off); train-adapter stores it as the pipeline's default [preset: finetune full 900, adapter full 0, tiny 16].", rich_help_panel=P_LOG)
_T_STOPP = typer.Option(None, "--sample-top-p", help="Top-p of the sample grids (0 = off); train-adapter stores it as the pipeline's default [preset: finetune full 0.95, adapter full 0.9, tiny 0].", rich_help_panel=P_LOG)
_T_LOG = typer.Option(None, "--log-every", help="Print / report loss, lr and tokens/s every N steps; OUT/metrics.jsonl gets every step [preset: full 20].", rich_help_panel=P_LOG)
_T_REPORT = choice_option(None, "--report-to", choices=("none", "tensorboard", "wandb"), show_default=False, help="Also log through accelerate's trackers: tensorboard (OUT/logs), wandb, or none [preset: none].", rich_help_panel=P_LOG)
_T_RESUME = typer.Option(None, "--resume", metavar="auto|never|latest|PATH", show_default=False, help="auto (default): continue from the newest checkpoint in OUT when it is of the same run (data, model, schedule, batch size, LoRA), start fresh when OUT has none, refuse when it holds another run's. never: start fresh. latest or a checkpoint folder: resume that one. Restores weights, optimizer, schedule, RNG and data position.", rich_help_panel=P_CKPT)
_T_RESUME_CHANGES = typer.Option(False, "--resume-with-changes", help="Resume a checkpoint made with other settings anyway: its weights, optimizer state and data position, then this command's settings; the changes are recorded in config.json / pipeline.json.", rich_help_panel=P_CKPT)
_T_OVER = typer.Option(False, "--overwrite", help="Start over in an OUT that already holds checkpoints (they are deleted).", rich_help_panel=P_CKPT)
_T_SEED = typer.Option(None, "--seed", help="Seed of the data order, dropout and new-row init [preset: 0].", rich_help_panel=P_DATA)
_T_LORA = typer.Option(None, "--lora/--no-lora", help="Train a peft LoRA on VAR's Linear layers instead of the full model (finetune) / on top of the frozen VAR (train-adapter) [preset: off].", show_default=False, rich_help_panel=P_LORA)
_T_RANK = typer.Option(None, "--lora-rank", help="LoRA rank r [preset: full 8].", rich_help_panel=P_LORA)
_T_ALPHA = typer.Option(None, "--lora-alpha", help="LoRA alpha (the update is scaled by alpha / r) [preset: full 32].", rich_help_panel=P_LORA)
_T_LDROP = typer.Option(None, "--lora-dropout", help="Dropout on the LoRA input [preset: full 0.05].", rich_help_panel=P_LORA)
_T_TARGETS = typer.Option(None, "--lora-targets", help="Comma-separated Linear names to adapt [preset: proj,fc1,fc2,ada_lin.1,word_embed,head: all that VAR calls as modules; mat_qkv is refused, attention reads its weight directly].", rich_help_panel=P_LORA)
_T_LSAVE = choice_option(None, "--lora-save", choices=("merged", "separate"), show_default=False, help="merged: LoRA folded into the saved weights (plain VAR, loads anywhere); separate: base weights + peft's adapter_model.safetensors beside them [preset: merged].", rich_help_panel=P_LORA)
_T_PUSH = typer.Option(None, "--push-to-hub", metavar="REPO", show_default=False, rich_help_panel=P_CKPT, help="Upload the result folder (with a generated model card, README.md) to this Hub repo at the end; uses your `hf auth login`.")
_T_PRIVATE = typer.Option(False, "--private", rich_help_panel=P_CKPT, help="With --push-to-hub: create the Hub repo private (an existing repo keeps its visibility).")
_T_PROGRESS = progress_every_option(P_LOG)
_T_VAE = typer.Option(None, "--vae", show_default=False, help="VQ-VAE whose codebook made the codes (default: the one named in the encode folder's manifest, else the one --var's model folder records). Only its quantizer runs in training, never its encoder.", rich_help_panel=P_MODEL)


def _train_options(params: dict) -> dict:
    """The command's parameters named like presets.TrainPreset fields, which is every training option (None: the
    preset's value). A new option needs its field there and its parameter here, nothing else."""
    from dataclasses import fields

    from popyou_cli.core.presets import TrainPreset

    options = {f.name: params[f.name] for f in fields(TrainPreset) if f.name in params}
    options["mixed_precision"] = _mixed_precision(params["dtype"], params["mixed_precision_old"])
    if options.get("scale_weights") is not None:
        try:
            options["scale_weights"] = tuple(float(x) for x in options["scale_weights"].split(","))
        except ValueError:
            raise PopyouError(f"--scale-weights must be comma-separated numbers (got {options['scale_weights']})") from None
    return options


def _mixed_precision(dtype: Optional[str], old: Optional[str]) -> Optional[str]:
    """--dtype as accelerate's mixed_precision (no, bf16, fp16); --mixed-precision is its old spelling."""
    if old is not None:
        old = {"no": "fp32"}.get(old.lower(), DTYPE_ALIASES.get(old.lower(), old.lower()))
    dtype = renamed(dtype, old, new_flag="--dtype", old_flag="--mixed-precision")
    if dtype is not None and dtype not in DTYPES:
        raise PopyouError(f"--dtype must be one of {', '.join(DTYPES)} (got '{dtype}')")
    if dtype == "auto":
        from popyou_cli.core.devices import dtype_name, resolve_device, resolve_dtype

        dtype = dtype_name(resolve_dtype("auto", resolve_device("auto"), "train"))
    return {"fp32": "no"}.get(dtype, dtype)


@user_errors
def finetune_cmd(
    data: Path = typer.Option(..., "--data", help="Folder made by 'popyou encode' (stored VQ codes; images are never re-encoded).", rich_help_panel=P_DATA),
    out: Path = typer.Option(..., "--out", help="Run folder: model/ (the result), checkpoints/, samples/, metrics.jsonl.", rich_help_panel=P_DATA),
    preset: str = _T_PRESET,
    var: Optional[str] = typer.Option(None, "--var", help="Starting VAR: Hub file or repo, local .pth/.safetensors, popyou model folder, or tiny [preset: full FoundationVision/var/var_d16.pth].", rich_help_panel=P_MODEL),
    vae: Optional[str] = _T_VAE,
    class_name: str = typer.Option("funko pop", "--class-name", help="Name stored for the trained class in config.json.", rich_help_panel=P_MODEL),
    init_from: str = typer.Option("mean", "--init-from", help="The new class row starts as: a class id (e.g. 578), 'mean' of all class rows, or 'random'.", rich_help_panel=P_MODEL),
    class_id: Optional[int] = typer.Option(None, "--class-id", help="Reuse this existing class id instead of adding a row (what the original did with ImageNet 578).", rich_help_panel=P_MODEL),
    lora: Optional[bool] = _T_LORA, lora_rank: Optional[int] = _T_RANK, lora_alpha: Optional[float] = _T_ALPHA,
    lora_dropout: Optional[float] = _T_LDROP, lora_targets: Optional[str] = _T_TARGETS, lora_save: Optional[str] = _T_LSAVE,
    lr: Optional[float] = _T_LR, batch_size: Optional[int] = _T_BS, grad_accum: Optional[int] = _T_ACCUM,
    max_steps: Optional[int] = _T_STEPS, epochs: Optional[float] = _T_EPOCHS, warmup: Optional[float] = _T_WARMUP,
    schedule: Optional[str] = _T_SCHED, min_lr_ratio: Optional[float] = _T_MINLR, weight_decay: Optional[float] = _T_WD,
    grad_clip: Optional[float] = _T_CLIP, dtype: Optional[str] = _T_DTYPE, label_smoothing: Optional[float] = _T_LS,
    scale_weights: Optional[str] = _T_SW, cond_drop: Optional[float] = _T_DROP, hflip: Optional[bool] = _T_HFLIP,
    save_every: Optional[int] = _T_SAVE, keep_last: Optional[int] = _T_KEEP, sample_every: Optional[int] = _T_SAMPLE,
    n_samples: Optional[int] = _T_NSAMP, sample_cfg: Optional[float] = _T_SCFG, sample_top_k: Optional[int] = _T_STOPK,
    sample_top_p: Optional[float] = _T_STOPP, log_every: Optional[int] = _T_LOG, report_to: Optional[str] = _T_REPORT,
    resume: Optional[str] = _T_RESUME, resume_with_changes: bool = _T_RESUME_CHANGES, overwrite: bool = _T_OVER,
    seed: Optional[int] = _T_SEED,
    push_to_hub: Optional[str] = _T_PUSH, private: bool = _T_PRIVATE, progress_every: Optional[float] = _T_PROGRESS,
    mixed_precision_old: Optional[str] = _T_OLD_MP,
):
    """Stage 1: teach VAR a new class from the encoded data (full model or LoRA). Multi-GPU:
    `accelerate launch --num_processes 8 -m popyou_cli finetune ...`. Example:
    popyou finetune --data data/enc --out runs/ft   then   popyou sample --var runs/ft/model --class-id 1000"""
    set_progress_every(progress_every)
    options = _train_options(locals())
    from popyou_cli.train.finetune import finetune

    res = finetune(data=data, out=out, preset=preset, vae=vae, class_name=class_name, init_from=init_from,
                   class_id=class_id, push=push_to_hub, private=private, overwrite=overwrite, console=console,
                   **options)
    if res.is_main_process:
        console.print(res.summary(), highlight=False, soft_wrap=True)
        typer.echo(str(res.model))


@user_errors
def train_adapter_cmd(
    data: Path = typer.Option(..., "--data", help="Folder made by 'popyou encode' (codes + SigLIP embeddings).", rich_help_panel=P_DATA),
    out: Path = typer.Option(..., "--out", help="Run folder: pipeline/ (the result), checkpoints/, samples/, metrics.jsonl, eval.json.", rich_help_panel=P_DATA),
    stage: str = choice_option("image", "--stage", choices=("image", "text"), help="image: SigLIP image embeddings (stage 2). text: text embeddings of --text-field (stage 3), usually with --init from the image stage.", rich_help_panel=P_DATA),
    var: Optional[str] = typer.Option(None, "--var", help="The VAR to steer, normally the model folder of 'popyou finetune' (default with --init: that pipeline's VAR).", rich_help_panel=P_MODEL),
    init: Optional[str] = typer.Option(None, "--init", help="Start the adapter from this pipeline (or adapter) folder, e.g. the image stage's OUT/pipeline.", rich_help_panel=P_MODEL),
    text_field: str = choice_option("prompt", "--text-field", choices=("prompt", "caption"), help="--stage text: train on the embeddings of the 'prompt' or the 'caption'.", rich_help_panel=P_DATA),
    class_id: Optional[int] = typer.Option(None, "--class-id", help="Class row used with the delta (default: the class finetune added).", rich_help_panel=P_MODEL),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="cond = alpha x class embedding + beta x adapter(embedding) [preset: 1].", rich_help_panel=P_MODEL),
    beta: Optional[float] = typer.Option(None, "--beta", help="Weight of the adapter's delta (see --alpha); stored as the sampling default [preset: 1].", rich_help_panel=P_MODEL),
    hidden_dim: Optional[int] = typer.Option(None, "--hidden-dim", help="Adapter hidden width (default: the VAR's width, 1024 for d16).", rich_help_panel=P_MODEL),
    adapter_init_gain: Optional[float] = typer.Option(None, "--adapter-init-gain", help="Xavier gain of the adapter's Linear layers at the start (full: the original's 1e-3; tiny: 1).", show_default=False, rich_help_panel=P_MODEL),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Rows held out to compare the loss with right vs shuffled embeddings (eval.json) [preset: full 0.02].", rich_help_panel=P_DATA),
    preset: str = _T_PRESET, vae: Optional[str] = _T_VAE,
    lora: Optional[bool] = _T_LORA, lora_rank: Optional[int] = _T_RANK, lora_alpha: Optional[float] = _T_ALPHA,
    lora_dropout: Optional[float] = _T_LDROP, lora_targets: Optional[str] = _T_TARGETS, lora_save: Optional[str] = _T_LSAVE,
    lr: Optional[float] = _T_LR, batch_size: Optional[int] = _T_BS, grad_accum: Optional[int] = _T_ACCUM,
    max_steps: Optional[int] = _T_STEPS, epochs: Optional[float] = _T_EPOCHS, warmup: Optional[float] = _T_WARMUP,
    schedule: Optional[str] = _T_SCHED, min_lr_ratio: Optional[float] = _T_MINLR, weight_decay: Optional[float] = _T_WD,
    grad_clip: Optional[float] = _T_CLIP, dtype: Optional[str] = _T_DTYPE, label_smoothing: Optional[float] = _T_LS,
    cond_drop: Optional[float] = _T_DROP, hflip: Optional[bool] = _T_HFLIP,
    save_every: Optional[int] = _T_SAVE, keep_last: Optional[int] = _T_KEEP, sample_every: Optional[int] = _T_SAMPLE,
    n_samples: Optional[int] = _T_NSAMP, sample_cfg: Optional[float] = _T_SCFG, sample_top_k: Optional[int] = _T_STOPK,
    sample_top_p: Optional[float] = _T_STOPP, log_every: Optional[int] = _T_LOG, report_to: Optional[str] = _T_REPORT,
    resume: Optional[str] = _T_RESUME, resume_with_changes: bool = _T_RESUME_CHANGES, overwrite: bool = _T_OVER,
    seed: Optional[int] = _T_SEED,
    push_to_hub: Optional[str] = _T_PUSH, private: bool = _T_PRIVATE, progress_every: Optional[float] = _T_PROGRESS,
    mixed_precision_old: Optional[str] = _T_OLD_MP,
):
    """Stages 2/3: train the adapter SigLIP embedding -> cond_delta that steers a frozen VAR. Example:
    popyou train-adapter --stage image --var runs/ft/model --data data/enc --out runs/img ;
    popyou train-adapter --stage text --init runs/img/pipeline --data data/enc --out runs/txt"""
    set_progress_every(progress_every)
    options = _train_options(locals())
    from popyou_cli.train.train_adapter import train_adapter

    res = train_adapter(data=data, out=out, stage=stage, preset=preset, init=init, text_field=text_field,
                        class_id=class_id, vae=vae, push=push_to_hub, private=private, overwrite=overwrite,
                        console=console, **options)
    if res.is_main_process:
        console.print(res.summary(), highlight=False, soft_wrap=True)
        typer.echo(str(res.pipeline))
