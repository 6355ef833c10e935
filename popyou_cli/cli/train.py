"""The training commands (finetune, train-adapter): parse options and call one stage function.

cli/app.py registers these functions on the `popyou` app, in pipeline order."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from popyou_cli.cli.common import DTYPES, PRESETS, choice_option, console, progress_every_option, user_errors
from popyou_cli.core.errors import PopyouError
from popyou_cli.core.progress import set_progress_every

# Help panels of the training options.
P_DATA, P_MODEL, P_OPT, P_LORA, P_CKPT, P_LOG = "Data", "Model", "Optimisation", "LoRA", "Checkpoints and Hub", "Logging"

# Options shared by both training commands; None means "the preset's value" (shown in brackets). Short help here;
# docs/cli.md has every option in full.
def _opt(panel: str, *names: str, help: str, **kw):
    return typer.Option(None, *names, rich_help_panel=panel, show_default=False, help=help, **kw)


_T_PRESET = choice_option("full", "--preset", choices=PRESETS, rich_help_panel=P_DATA, help="full: the original "
                          "recipe (GPU, fp16); tiny: stand-ins, a few CPU steps.")
_T_LR = _opt(P_OPT, "--lr", help="Peak AdamW learning rate [preset: finetune 3e-4, adapter 1e-4].")
_T_BS = _opt(P_OPT, "--batch-size", help="Rows per process per micro-batch [preset: 4].")
_T_ACCUM = _opt(P_OPT, "--grad-accum", help="Micro-batches per step [preset: finetune 2, adapter 1].")
_T_STEPS = _opt(P_OPT, "--max-steps", help="Optimizer steps [preset: finetune 30000, adapter 20000].")
_T_EPOCHS = _opt(P_OPT, "--epochs", help="Passes over the data instead of --max-steps.")
_T_WARMUP = _opt(P_OPT, "--warmup", help="Warm-up: a fraction if < 1, else steps [preset: finetune 0.08].")
_T_SCHED = choice_option(None, "--schedule", choices=("linear", "cosine", "constant"), show_default=False,
                         rich_help_panel=P_OPT, help="Decay after the warm-up [preset: linear].")
_T_MINLR = _opt(P_OPT, "--min-lr-ratio", help="Where the decay ends, x --lr [preset: 0].")
_T_WD = _opt(P_OPT, "--weight-decay", help="AdamW weight decay on matrices [preset: 0.05].")
_T_CLIP = _opt(P_OPT, "--grad-clip", help="Gradient norm clip (0: off) [preset: 1].")
_T_DTYPE = choice_option(None, "--dtype", choices=DTYPES, noun="dtype", show_default=False, rich_help_panel=P_OPT,
                         help="Mixed precision; fp16 needs CUDA [preset: full fp16, tiny fp32].")
_T_LS = _opt(P_OPT, "--label-smoothing", help="Of the cross-entropy [preset: finetune 0.1, adapter 0].")
_T_SW = _opt(P_OPT, "--scale-weights", help="Loss weight per scale, comma-separated (default: equal).")
_T_DROP = _opt(P_OPT, "--cond-drop", help="Null-class rows, for guidance [preset: 0.1].")
_T_HFLIP = _opt(P_DATA, "--hflip/--no-hflip", help="Mirrored codes for half the rows [preset: on].")
_T_SAVE = _opt(P_CKPT, "--save-every", help="Checkpoint every N steps, and at the end [preset: full 1000].")
_T_KEEP = _opt(P_CKPT, "--keep-last", help="Checkpoints kept [preset: full 3].")
_T_SAMPLE = _opt(P_LOG, "--sample-every", help="Sample grid every N steps [preset: full 1000].")
_T_NSAMP = _opt(P_LOG, "--n-samples", help="Images per grid (0: none) [preset: full 8].")
_T_SCFG = _opt(P_LOG, "--sample-cfg", help="Guidance of the grids [preset: finetune full 4, else 1.5].")
_T_STOPK = _opt(P_LOG, "--sample-top-k", help="Top-k of the grids [preset: ft full 900, adapter full 0, tiny 16].")
_T_STOPP = _opt(P_LOG, "--sample-top-p", help="Top-p of the grids [preset: ft full 0.95, adapter full 0.9].")
_T_LOG = _opt(P_LOG, "--log-every", help="Loss line every N steps [preset: full 20].")
_T_REPORT = choice_option(None, "--report-to", choices=("none", "tensorboard", "wandb"), show_default=False,
                          rich_help_panel=P_LOG, help="accelerate's trackers [preset: none].")
_T_RESUME = _opt(P_CKPT, "--resume", metavar="auto|never|latest|PATH", help="auto: continue this run's newest "
                 "checkpoint, if any.")
_T_RESUME_CHANGES = typer.Option(False, "--resume-with-changes", rich_help_panel=P_CKPT, help="Resume a "
                                 "checkpoint made with other settings.")
_T_OVER = typer.Option(False, "--overwrite", rich_help_panel=P_CKPT, help="Start over: delete OUT's checkpoints.")
_T_SEED = _opt(P_DATA, "--seed", help="Data order, dropout, new-row init [preset: 0].")
_T_LORA = _opt(P_LORA, "--lora/--no-lora", help="Train a peft LoRA instead [preset: off].")
_T_RANK = _opt(P_LORA, "--lora-rank", help="LoRA rank r [preset: full 8].")
_T_ALPHA = _opt(P_LORA, "--lora-alpha", help="LoRA alpha (scale alpha / r) [preset: full 32].")
_T_LDROP = _opt(P_LORA, "--lora-dropout", help="Dropout on the LoRA input [preset: full 0.05].")
_T_TARGETS = _opt(P_LORA, "--lora-targets", help="Comma-separated Linear names [preset: proj, fc1, fc2, "
                  "ada_lin.1, word_embed, head].")
_T_LSAVE = choice_option(None, "--lora-save", choices=("merged", "separate"), show_default=False,
                         rich_help_panel=P_LORA, help="Folded in, or beside the weights [preset: merged].")
_T_PUSH = _opt(P_CKPT, "--push-to-hub", metavar="REPO", help="Upload the result with a model card at the end.")
_T_PRIVATE = typer.Option(False, "--private", rich_help_panel=P_CKPT, help="With --push-to-hub: a private repo.")
_T_PROGRESS = progress_every_option(P_LOG)
_T_VAE = _opt(P_MODEL, "--vae", metavar="SPEC", help="VQ-VAE of the codes. Default: the encode folder's.")


def _train_options(params: dict) -> dict:
    """The command's parameters named like presets.TrainPreset fields, which is every training option (None: the
    preset's value). A new option needs its field there and its parameter here, nothing else."""
    from dataclasses import fields

    from popyou_cli.core.presets import TrainPreset

    options = {f.name: params[f.name] for f in fields(TrainPreset) if f.name in params}
    options["mixed_precision"] = _mixed_precision(params["dtype"])
    if options.get("scale_weights") is not None:
        try:
            options["scale_weights"] = tuple(float(x) for x in options["scale_weights"].split(","))
        except ValueError:
            raise PopyouError(f"--scale-weights must be comma-separated numbers (got {options['scale_weights']})") from None
    return options


def _mixed_precision(dtype: Optional[str]) -> Optional[str]:
    """--dtype (checked by choice_option) as accelerate's mixed_precision: no, bf16 or fp16."""
    if dtype == "auto":
        from popyou_cli.core.devices import dtype_name, resolve_device, resolve_dtype

        dtype = dtype_name(resolve_dtype("auto", resolve_device("auto"), "train"))
    return {"fp32": "no"}.get(dtype, dtype)


@user_errors
def finetune_cmd(
    data: Path = typer.Option(..., "--data", metavar="DIR", rich_help_panel=P_DATA, help="An encode folder."),
    out: Path = typer.Option(..., "--out", metavar="DIR", rich_help_panel=P_DATA, help="Run folder; the result "
                             "is OUT/model."),
    preset: str = _T_PRESET,
    var: Optional[str] = _opt(P_MODEL, "--var", metavar="SPEC", help="Starting VAR: file, folder, Hub file or tiny "
                              "[preset: full var_d16]."),
    vae: Optional[str] = _T_VAE,
    class_name: str = typer.Option("funko pop", "--class-name", rich_help_panel=P_MODEL, help="The new class's "
                                   "name."),
    init_from: str = typer.Option("mean", "--init-from", rich_help_panel=P_MODEL, help="The new row starts as a "
                                  "class id, mean or random."),
    class_id: Optional[int] = _opt(P_MODEL, "--class-id", help="Reuse this class row instead of adding one."),
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
):
    """Stage 1: teach VAR a new class from the encoded data.

    The full model or a LoRA. Several GPUs:
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
    data: Path = typer.Option(..., "--data", metavar="DIR", rich_help_panel=P_DATA, help="An encode folder."),
    out: Path = typer.Option(..., "--out", metavar="DIR", rich_help_panel=P_DATA, help="Run folder; the result "
                             "is OUT/pipeline."),
    stage: str = choice_option("image", "--stage", choices=("image", "text"), rich_help_panel=P_DATA,
                               help="Train on image (stage 2) or text embeddings (3)."),
    var: Optional[str] = _opt(P_MODEL, "--var", metavar="SPEC", help="The VAR to steer (finetune's OUT/model). "
                              "Default with --init: its VAR."),
    init: Optional[str] = _opt(P_MODEL, "--init", metavar="DIR", help="Start from this pipeline, e.g. the image "
                               "stage's."),
    text_field: str = choice_option("prompt", "--text-field", choices=("prompt", "caption"), rich_help_panel=P_DATA,
                                    help="--stage text: which text's embeddings."),
    class_id: Optional[int] = _opt(P_MODEL, "--class-id", help="Class row used with the delta. Default: "
                                   "finetune's class."),
    alpha: Optional[float] = _opt(P_MODEL, "--alpha", help="Weight of the class embedding [preset: 1]."),
    beta: Optional[float] = _opt(P_MODEL, "--beta", help="Weight of the adapter's delta [preset: 1]."),
    hidden_dim: Optional[int] = _opt(P_MODEL, "--hidden-dim", help="Adapter width. Default: the VAR's."),
    adapter_init_gain: Optional[float] = _opt(P_MODEL, "--adapter-init-gain", help="Xavier gain at the start "
                                              "(full 1e-3, tiny 1)."),
    val_fraction: Optional[float] = _opt(P_DATA, "--val-fraction", help="Rows held out for eval.json [preset: "
                                         "full 0.02]."),
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
):
    """Stages 2/3: train the adapter that steers a frozen VAR.

    SigLIP embedding -> adapter -> cond_delta. Example:
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
