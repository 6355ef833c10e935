"""The accepted range of every count, seed and number a user types, checked before any work starts: the one place
the limits are written (the CLI and the stages call these checks where options are parsed).

Each check raises a one-line PopyouError that names the option and its range. The limits are what the code can
honour, not taste:
* seeds: 0 <= seed < 2^63, what torch.Generator.manual_seed and the int64 `seed` column hold without wrapping;
  a command that uses seed, seed+1, ... seed+n-1 must keep the last one in range too;
* rows of a data set: at most 10^9. A shard file's name carries its rows in 9 digits, and 10^9 images at
  512 px are about 400 TB: a larger --n is a typo, and one refused at once costs less than one that runs;
* shards of a folder: at most 10^6 files (state.json lists them all, and every rerun scans them);
* batch sizes: at most 65536 rows, far beyond what fits in any accelerator at once;
* optimizer steps: at most 10^8 (VAR itself trains for about 10^5; a checkpoint's step beyond this is damage);
  --epochs at most 10^6, and the steps they make are held to the same 10^8;
* LoRA rank: 1..4096 (the widest VAR is 1920 wide: a larger rank only costs memory);
* condition weights --alpha, --beta and a beta sweep's ends: |w| <= 100 (the original's slider went to 2.5; past
  100 the condition swamps every other input of the transformer); --adapter-init-gain in [0, 100];
* images per command: sample --n at most 100,000 per prompt, eval --n-prompts 2..50,000 (FID's usual sample
  count), a training grid --n-samples 0..256; `bench gen-data --n` at most 10,000 (a benchmark, not a data set).
"""
from __future__ import annotations

import math

from popyou_cli.core.errors import PopyouError

MAX_SEED = 2**63
MAX_ROWS = 10**9
MAX_SHARDS = 10**6
MAX_BATCH = 65536
MAX_STEPS = 10**8
MAX_EPOCHS = 10**6
MAX_LORA_RANK = 4096
MAX_WEIGHT = 100.0  # |alpha|, |beta|, the ends of a beta sweep, the adapter's init gain
MAX_SAMPLE_IMAGES = 100_000  # sample --n (per prompt)
MAX_EVAL_IMAGES = 50_000  # eval --n-prompts, --max-reference
MAX_GRID_IMAGES = 256  # a training run's sample grid (--n-samples)
MAX_BENCH_IMAGES = 10_000  # bench gen-data/caption/encode --n
MAX_KEEP = 10_000  # checkpoints kept (--keep-last)


def check_int(flag: str, value: int | None, low: int, high: int) -> None:
    """low <= value <= high (None: not given, nothing to check)."""
    if value is not None and not low <= value <= high:
        raise PopyouError(f"{flag} must be in {low}..{high:_} (got {value:_})")


def check_seed(flag: str, seed: int | None, count: int = 1) -> None:
    """0 <= seed and, for a command that uses seed .. seed + count - 1, the last one < 2^63 too."""
    if seed is None:
        return
    if not 0 <= seed < MAX_SEED:
        raise PopyouError(f"{flag} must be in [0, 2^63) (got {seed})")
    if seed + count - 1 >= MAX_SEED:
        raise PopyouError(f"{flag} {seed} with {count} images uses seeds up to {seed + count - 1}, past 2^63 - 1; "
                          f"{flag} must be in [0, 2^63 - {count}]")


def check_finite(**values: float | None) -> None:
    """Every given number finite (NaN and infinities are refused); keys are option names, e.g. lr=..."""
    for name, v in values.items():
        if v is not None and not math.isfinite(v):
            raise PopyouError(f"--{name.replace('_', '-')} must be a finite number (got {v})")


def check_float(flag: str, value: float | None, low: float, high: float) -> None:
    """A finite low <= value <= high (None: not given)."""
    if value is None:
        return
    if not math.isfinite(value) or not low <= value <= high:
        raise PopyouError(f"{flag} must be a finite number in [{low:g}, {high:g}] (got {value:g})")


def check_weights(**weights: float | None) -> None:
    """Condition weights (alpha, beta, ...): finite, |w| <= MAX_WEIGHT; keys are option names."""
    for name, w in weights.items():
        check_float(f"--{name.replace('_', '-')}", w, -MAX_WEIGHT, MAX_WEIGHT)


def check_rows(n: int, shard_size: int) -> None:
    """--n and --shard-size of a data stage: 1..MAX_ROWS rows in at most MAX_SHARDS shards."""
    check_int("--n", n, 1, MAX_ROWS)
    check_int("--shard-size", shard_size, 1, MAX_ROWS)
    shards = -(-n // shard_size)
    if shards > MAX_SHARDS:
        raise PopyouError(f"--n {n} in shards of {shard_size} rows makes {shards} shard files, more than "
                          f"{MAX_SHARDS}; raise --shard-size to at least {-(-n // MAX_SHARDS)}")


def check_sweep_ends(start: float, end: float) -> None:
    """A beta sweep's START and END, as --beta."""
    check_float("--beta-sweep START and END each", start, -MAX_WEIGHT, MAX_WEIGHT)
    check_float("--beta-sweep START and END each", end, -MAX_WEIGHT, MAX_WEIGHT)


def check_sample_options(*, n: int, batch_size: int, seed: int | None, alpha: float | None = None,
                         beta: float | None = None, beta_sweep: str | None = None, cfg: float | None = None,
                         top_k: int | None = None, cfg_scales: int | None = None) -> None:
    """`popyou sample`'s numbers (image k of each prompt uses seed + k)."""
    check_int("--n", n, 1, MAX_SAMPLE_IMAGES)
    check_int("--batch-size", batch_size, 1, MAX_BATCH)
    check_seed("--seed", seed, n)
    check_weights(alpha=alpha, beta=beta)
    check_float("--cfg", cfg, 0, MAX_WEIGHT)
    check_int("--top-k", top_k, 0, 1 << 20)
    check_int("--cfg-scales", cfg_scales, 0, 64)
    if beta_sweep:
        parts = beta_sweep.split(":")
        try:
            start, end = float(parts[0]), float(parts[1])
        except (ValueError, IndexError):
            return  # the sweep's own parser words a malformed spec
        check_sweep_ends(start, end)


def check_eval_options(*, n_prompts: int, batch_size: int, seed: int, max_reference: int,
                       cfg: float | None = None, top_k: int | None = None, cfg_scales: int | None = None) -> None:
    """`popyou eval`'s numbers (image k uses seed + k)."""
    check_int("--n-prompts", n_prompts, 2, MAX_EVAL_IMAGES)
    check_int("--batch-size", batch_size, 1, MAX_BATCH)
    check_int("--max-reference", max_reference, 2, MAX_EVAL_IMAGES)
    check_seed("--seed", seed, n_prompts)
    check_float("--cfg", cfg, 0, MAX_WEIGHT)
    check_int("--top-k", top_k, 0, 1 << 20)
    check_int("--cfg-scales", cfg_scales, 0, 64)


def check_demo_options(*, port: int, cfg_scales: int | None = None) -> None:
    check_int("--port", port, 1, 65535)
    check_int("--cfg-scales", cfg_scales, 0, 64)


def check_training(cfg) -> None:
    """The numbers of a presets.TrainPreset (finetune, train-adapter) beyond what TrainPreset.check refuses."""
    check_int("--max-steps", cfg.max_steps, 1, MAX_STEPS)
    check_float("--epochs", cfg.epochs, 0, MAX_EPOCHS)
    check_int("--lora-rank", cfg.lora_rank, 1, MAX_LORA_RANK)
    check_float("--lora-alpha", cfg.lora_alpha, 0, 1e4)
    check_float("--lora-dropout", cfg.lora_dropout, 0, 1)
    check_int("--hidden-dim", cfg.hidden_dim, 0, MAX_BATCH)
    check_float("--adapter-init-gain", cfg.adapter_init_gain, 0, MAX_WEIGHT)
    check_weights(alpha=cfg.alpha, beta=cfg.beta)
    check_float("--lr", cfg.lr, 0, 10)
    check_float("--warmup", cfg.warmup, 0, MAX_STEPS)
    check_float("--weight-decay", cfg.weight_decay, 0, 10)
    check_float("--grad-clip", cfg.grad_clip, 0, 1e6)
    for beta in cfg.betas or ():
        check_float("--betas", beta, 0, 1)
    for w in cfg.scale_weights or ():
        check_float("--scale-weights", w, 0, 1e6)
    check_int("--save-every", cfg.save_every, -1, MAX_STEPS)
    check_int("--sample-every", cfg.sample_every, 0, MAX_STEPS)
    check_int("--log-every", cfg.log_every, 1, MAX_STEPS)
    check_int("--keep-last", cfg.keep_last, 1, MAX_KEEP)
    check_int("--n-samples", cfg.n_samples, 0, MAX_GRID_IMAGES)
    check_float("--sample-cfg", cfg.sample_cfg, 0, MAX_WEIGHT)
    check_int("--sample-top-k", cfg.sample_top_k, 0, 1 << 20)
    check_float("--sample-top-p", cfg.sample_top_p, 0, 1)
