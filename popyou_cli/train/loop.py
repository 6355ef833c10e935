"""The one training loop behind `popyou finetune` and `popyou train-adapter`, on accelerate.

A stage builds one nn.Module holding every part (frozen parts with requires_grad False), a dict of row tensors
already in memory (codes, embeddings: training never touches images or the VQ-VAE encoder), and a
`loss_fn(model, batch) -> scalar`; `train` does the rest:

* AdamW with VAR's no-weight-decay groups, warm-up then linear or cosine decay, gradient accumulation and
  clipping, mixed precision (bf16 / fp16 with a GradScaler / no), DDP under `torchrun` or `accelerate launch`.
* Data order: epoch e is the permutation `randperm(N)` seeded by (seed, e); micro-batch m of the run takes the
  rows [b*G, (b+1)*G) of its epoch's permutation (G = batch x processes, rank r its r-th slice, the short tail
  dropped). The position is one integer, so resume skips consumed batches without reading them.
* Checkpoints `run/checkpoints/step-N/`: trainable weights, optimizer, scheduler, scaler, every rank's RNG and the
  position, written into `step-N.tmp/` and renamed, the last K kept. Frozen weights are rebuilt by the stage.
  Which checkpoint a run resumes, and whether it is the same run, is resume.py's (`--resume auto` by default).
* `metrics.jsonl` (rank 0, one line per step, truncated to the resume point), accelerate trackers, progress
  (progress.py: a bar on a terminal, else timestamped lines with an ETA), `samples/step-N.png` from `sample_fn`.
* A loss that turns NaN/Inf stops the run before the optimizer step, with the last good checkpoint left intact.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from popyou_cli.core.bounds import MAX_STEPS
from popyou_cli.core.errors import PopyouError
from popyou_cli.core.files import append_line, atomic_write
from popyou_cli.core.presets import TrainPreset
from popyou_cli.train.resume import (check_resume, load_checkpoint, remove_checkpoints, remove_unfinished, resolve_resume,
                     run_definition, save_checkpoint)
from popyou_cli.core.progress import Progress

# Name fragments the VAR recipe exempts from weight decay (var-spec.md section 3); 1-D params and biases too.
NO_DECAY_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                 "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")
# Seed mixers, primes larger than any epoch or process count: the permutation of (seed, epoch) and the RNG stream
# of (seed, rank) never coincide with those of a neighbouring seed. Changing them changes every run's data order.
EPOCH_SEED_STRIDE = 100003
RANK_SEED_STRIDE = 1009


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # mean loss of each optimizer step run in this call
    last_checkpoint: Path | None
    tokens_per_s: float
    resumed_from: Path | None = None  # the checkpoint this call started from
    history: list = field(default_factory=list)  # settings changed by --resume-with-changes: [{step, changed}]


def make_accelerator(cfg: TrainPreset, run_dir: Path, dtype_from_preset: str | None = None):
    """The process's Accelerator. Also checks the mixed precision and tracker choices before anything loads.
    `dtype_from_preset`: the preset's name when the user gave no --dtype (an error then names the preset)."""
    import importlib.util

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cfg.check()
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        raise PopyouError(f"--report-to {cfg.report_to} needs the '{cfg.report_to}' package (pip install "
                          f"{cfg.report_to}), or use --report-to none (metrics.jsonl is always written)")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        if dtype_from_preset:  # the user never wrote --dtype fp16: name what set it
            raise PopyouError(f"the {dtype_from_preset} preset trains in fp16 on a GPU, and no CUDA GPU is visible; "
                              "on this CPU pass --preset tiny, or --dtype fp32")
        raise PopyouError("--dtype fp16 needs a CUDA GPU for training (its loss scaler is CUDA-only); "
                          "use bf16 or fp32 on CPU")
    # accelerate keeps one global state per process; a second stage run in the same Python process (tests,
    # notebooks) may ask for another precision, so the precision part is reset, the process group kept.
    AcceleratorState._reset_state()
    # cpu=True on a machine without CUDA: accelerate 1.15 only sets up DDP over gloo (torchrun on CPUs) with it.
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                       project_dir=str(run_dir / "logs"),
                       log_with=None if cfg.report_to == "none" else cfg.report_to)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # class_emb too (unlike VAR's from-scratch recipe): fine-tuning feeds one or two rows, and decoupled
        # decay would shrink every unused class row, so the original classes would fade with the steps.
        if p.ndim <= 1 or name.endswith("bias") or any(k in name for k in NO_DECAY_KEYS + ("class_emb",)):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, total: int, cfg: TrainPreset) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based): linear warm-up, then the decay."""
    warm = int(round(cfg.warmup * total)) if cfg.warmup < 1 else int(cfg.warmup)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    t = (step - warm) / max(1, total - warm)
    shape = 1 - t if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * t))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def total_steps(cfg: TrainPreset, n_rows: int, world: int) -> tuple[int, int]:
    """(optimizer steps of the run, micro-batches per epoch)."""
    per_epoch = n_rows // (cfg.batch_size * world)
    if per_epoch < 1:
        raise PopyouError(f"the training set has {n_rows} rows, fewer than one batch across processes "
                          f"({cfg.batch_size} x {world}); lower --batch-size or add data")
    if cfg.max_steps is not None:
        return cfg.max_steps, per_epoch
    steps = max(1, int(cfg.epochs * per_epoch / cfg.grad_accum))
    if steps > MAX_STEPS:
        raise PopyouError(f"--epochs {cfg.epochs:g} of {n_rows} rows make {steps:_} optimizer steps, more than "
                          f"{MAX_STEPS:_}; lower --epochs to at most {MAX_STEPS * cfg.grad_accum / per_epoch:g}")
    return steps, per_epoch


def batch_rows(micro: int, n_rows: int, per_epoch: int, cfg: TrainPreset, rank: int, world: int) -> torch.Tensor:
    """Row indices of this rank's part of micro-batch `micro` (see the module docstring)."""
    epoch, b = divmod(micro, per_epoch)
    # Modulo 2^64, what manual_seed takes: seeds up to 2^63 work, and smaller seeds keep their data order.
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(
        (cfg.seed * EPOCH_SEED_STRIDE + epoch) % 2**64))
    G = cfg.batch_size * world
    return perm[b * G + rank * cfg.batch_size: b * G + (rank + 1) * cfg.batch_size]


# ------------------------------------------------------------------------------------------ the loop
def train(model: nn.Module, rows: dict[str, torch.Tensor], loss_fn: Callable, cfg: TrainPreset, run_dir: Path, *,
          accelerator, tokens_per_row: int = 1, sample_fn: Callable | None = None, console=None,
          on_step: Callable[[int, float], None] | None = None, overwrite: bool = False,
          project: str = "popyou", tracker_config: dict | None = None, run: dict | None = None) -> TrainResult:
    """Trains `model` in place. rows: equal-length tensors (CPU); each batch goes to the device as a dict.
    sample_fn(unwrapped_model, step) -> (H, W, 3) uint8 grid. on_step(step, loss) runs after every step.
    tracker_config: the stage's settings, logged with the trackers beside cfg. run: what defines the run besides
    cfg (data, model, stage options; resume.py): a checkpoint of other settings is not resumed silently."""
    acc, run_dir = accelerator, Path(run_dir)
    n_rows = len(next(iter(rows.values())))
    total, per_epoch = total_steps(cfg, n_rows, acc.num_processes)
    definition = run_definition(cfg, rows=n_rows, world_size=acc.num_processes, **(run or {}))
    start_ckpt = resolve_resume(cfg.resume, run_dir, overwrite)
    changes = check_resume(start_ckpt, definition, cfg, run_dir) if start_ckpt is not None else {}
    _clean_run_folder(acc, run_dir, wipe=start_ckpt is None and overwrite)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PopyouError("nothing to train: every parameter is frozen")
    opt, sched = _optimizer(model, cfg, acc.device, total)
    model, opt = acc.prepare(model, opt)
    state = {"step": 0, "micro": 0, "total": total, "run": definition, "history": []}
    if start_ckpt is not None:
        state = _resume(acc, model, opt, sched, start_ckpt, changes, state, cfg)
    if start_ckpt is None or (changes and not (start_ckpt / f"rng-{acc.process_index}.pt").is_file()):
        _seed_process(cfg, acc.process_index)
    metrics = run_dir / "metrics.jsonl"
    if acc.is_main_process:
        _truncate_metrics(metrics, state["step"])
    if cfg.report_to != "none":
        acc.init_trackers(project, config=_flat({**asdict(cfg), **(tracker_config or {})}))

    tok_per_step = cfg.batch_size * cfg.grad_accum * acc.num_processes * tokens_per_row
    losses, last = [], start_ckpt
    progress = Progress(project.removeprefix("popyou-"), total, console=console, unit="steps", start=state["step"],
                        enabled=acc.is_main_process, fmt=_train_fields)
    t_log, s_log, tps = time.perf_counter(), state["step"], 0.0
    t0, s0 = t_log, s_log
    with progress:
        while state["step"] < total:
            mean_loss = _accumulate(acc, model, rows, loss_fn, cfg, state, n_rows, per_epoch)
            if not math.isfinite(mean_loss):
                if cfg.report_to != "none":
                    acc.end_training()
                raise PopyouError(f"stopped: the loss became {mean_loss} at step {state['step'] + 1}; nothing was "
                                  f"updated or saved after it. Last good checkpoint: {last or 'none'}. Lower --lr, "
                                  "raise --warmup, or use --mixed-precision bf16/no, then --resume latest")
            gnorm = acc.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            step, lr = state["step"], sched.get_last_lr()[0]
            losses.append(mean_loss)
            if acc.is_main_process:
                _append_metrics(metrics, step, mean_loss, lr, state["micro"] / per_epoch, gnorm)
            if step % cfg.log_every == 0 or step == total:
                now = time.perf_counter()
                tps = tok_per_step * (step - s_log) / max(now - t_log, 1e-9)
                t_log, s_log = now, step
                if cfg.report_to != "none":
                    acc.log({"train/loss": mean_loss, "train/lr": lr, "train/tokens_per_s": tps}, step=step)
            # In a log file: a line every --log-every steps besides the one every --progress-every seconds.
            progress.update(step, log=step % cfg.log_every == 0, loss=mean_loss, lr=lr, tps=tps)
            if on_step is not None:
                on_step(step, mean_loss)
            if cfg.save_every >= 0 and ((cfg.save_every and step % cfg.save_every == 0) or step == total):
                last = save_checkpoint(acc, model, opt, sched, state, run_dir, cfg.keep_last)
            if sample_fn is not None and ((cfg.sample_every and step % cfg.sample_every == 0) or step == total):
                _sample(acc, model, sample_fn, step, run_dir)
    if cfg.report_to != "none":
        acc.end_training()
    overall = tok_per_step * (state["step"] - s0) / max(time.perf_counter() - t0, 1e-9)  # checkpoints included
    return TrainResult(steps=state["step"], losses=losses, last_checkpoint=last, tokens_per_s=overall,
                       resumed_from=start_ckpt, history=state["history"])


def _clean_run_folder(acc, run_dir: Path, wipe: bool) -> None:
    """On the main process: the checkpoints of a run started over (wipe) and an unfinished checkpoint go, the
    checkpoints folder is made; the other processes wait for it."""
    if acc.is_main_process:
        if wipe:
            remove_checkpoints(run_dir)
        remove_unfinished(run_dir)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()


def _optimizer(model: nn.Module, cfg: TrainPreset, device: torch.device, total: int):
    """AdamW over VAR's decay groups (fused on CUDA, as VAR trains) and its warm-up/decay schedule. The scheduler
    is not handed to accelerate.prepare: its wrapper steps once per process, which would run the schedule
    num_processes times too fast; here it steps once per optimizer step."""
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                            fused=device.type == "cuda" or None)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg))


def _resume(acc, model, opt, sched, start_ckpt: Path, changes: dict, state: dict, cfg: TrainPreset) -> dict:
    """The checkpoint's weights, optimizer, scheduler and position; with --resume-with-changes, this command's
    settings replace the checkpoint's (optimizer.load_state_dict restored those) and the change is recorded.
    Returns the run's state from the checkpoint's step on."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    old = load_checkpoint(acc, model, opt, sched, start_ckpt, changed=bool(changes))
    history = old.get("history", [])
    if changes:
        for group, new in zip(opt.param_groups, fresh):
            group.update(new)
        sched.base_lrs = [g["initial_lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(sched.last_epoch, state["total"], cfg)
        history = history + [{"step": old["step"], "changed": changes}]
    return {**state, "step": old["step"], "micro": old["micro"], "history": history}


def _seed_process(cfg: TrainPreset, rank: int) -> None:
    """Every rank its own stream (class dropout differs per rank); the model was built before this. numpy takes
    seeds below 2^32, torch below 2^64: reduced so, every seed under 2^63 works."""
    torch.manual_seed((cfg.seed * RANK_SEED_STRIDE + rank) % 2**64)
    random.seed(cfg.seed + rank)
    np.random.seed((cfg.seed + rank) % 2**32)


def _accumulate(acc, model, rows: dict, loss_fn: Callable, cfg: TrainPreset, state: dict, n_rows: int,
                per_epoch: int) -> float:
    """The gradients of one optimizer step: --grad-accum micro-batches (DDP all-reduces on the last one only).
    Advances state["micro"]; returns the step's mean loss, the same value on every rank."""
    model.train()
    loss_sum = torch.zeros((), device=acc.device)
    for k in range(cfg.grad_accum):
        idx = batch_rows(state["micro"], n_rows, per_epoch, cfg, acc.process_index, acc.num_processes)
        batch = {c: t[idx].to(acc.device, non_blocking=True) for c, t in rows.items()}
        sync = k == cfg.grad_accum - 1
        with contextlib.nullcontext() if sync else acc.no_sync(model):
            loss = loss_fn(model, batch)
            acc.backward(loss / cfg.grad_accum)
        loss_sum += loss.detach().float()
        state["micro"] += 1
    return acc.reduce(loss_sum / cfg.grad_accum, reduction="mean").item()


def _append_metrics(path: Path, step: int, loss: float, lr: float, epoch: float, gnorm) -> None:
    """One line of metrics.jsonl (rank 0)."""
    rec = {"step": step, "loss": loss, "lr": lr, "epoch": epoch}
    if gnorm is not None:
        rec["grad_norm"] = float(gnorm)
    append_line(path, json.dumps(rec))


def _sample(acc, model, sample_fn, step: int, run_dir: Path) -> None:
    if acc.is_main_process:
        from popyou_cli.core.images import save_png

        inner = acc.unwrap_model(model)  # no DDP hooks: only rank 0 runs it, the others wait below
        was = inner.training
        inner.eval()
        # Forked RNG: whatever sampling draws must not shift the training stream, or a run resumed from the
        # checkpoint saved just before (which restores the stream as it was then) would train on other draws.
        devices = [acc.device] if acc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), acc.autocast():
            grid = sample_fn(inner, step)
        inner.train(was)
        (run_dir / "samples").mkdir(exist_ok=True)
        save_png(grid, run_dir / "samples" / f"step-{step}.png")
    acc.wait_for_everyone()


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop the lines of steps that are about to be redone, so the file is one clean curve."""
    if not path.is_file():
        return
    def step_of(line: str) -> int | None:  # a kill or a full disk mid-append leaves a partial last line
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return None

    keep = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if (s := step_of(ln)) is not None and s <= step]
    atomic_write(path, "".join(ln + "\n" for ln in keep))


def read_metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.is_file() else []


def _flat(d: dict) -> dict:
    """Trackers take numbers and strings only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str) for k, v in d.items()}


def _train_fields(fields: dict) -> str:
    return f"loss {fields['loss']:.4f}, lr {fields['lr']:.2e}, {fields['tps']:,.0f} tokens/s"
