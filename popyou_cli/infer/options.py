"""What a user may ask of sampling, checked once: the options with their defaults, prompt lists, beta sweeps, seeds.

Defaults come in three layers: what the caller passes, then the pipeline's `sampling` defaults (pipeline.json),
then VAR's own (`VAR_DEFAULTS`, the reference demo's values). Every check raises a one-line PopyouError before any
model is loaded, with the accepted range in the message, and names where the value came from: the option
(`--cfg`) or, for a pipeline's default, `pipeline.json's sampling.cfg`. The Python API is held to the CLI's bounds
(core/bounds.py): |alpha|, |beta| <= 100.
"""
from __future__ import annotations

import math
import random
import shutil
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from popyou_cli.core.bounds import MAX_WEIGHT, check_float, check_seed
from popyou_cli.core.errors import PopyouError

VAR_DEFAULTS = {"cfg": 1.5, "top_k": 900, "top_p": 0.96, "more_smooth": False, "alpha": 1.0, "beta": 1.0,
                "cfg_scales": None}
MAX_SWEEP_FRAMES = 600  # a minute of video at 10 fps; longer sweeps are a typo more often than a wish


@dataclass
class SamplingOptions:
    """Sampling settings; None means "the pipeline's default" until `resolve` fills it in."""
    cfg: float | None = None  # classifier-free guidance at the last scale (ramped from 0); 0 turns it off
    top_k: int | None = None  # 0 turns it off; capped at the vocabulary
    top_p: float | None = None  # 0 turns it off
    more_smooth: bool | None = None  # Gumbel-softmax blending of the codes (smoother, less detailed)
    alpha: float | None = None  # weight of the class embedding in the condition
    beta: float | None = None  # weight of the text condition (cond_delta)
    cfg_scales: int | None = None  # guidance only on the first K scales (None: all)

    def check(self, from_pipeline: frozenset[str] = frozenset()) -> "SamplingOptions":
        """Range checks of whatever is set (NaN and infinities included). `from_pipeline`: the options whose value
        is the pipeline's default, which the messages name as pipeline.json does (the user gave no such flag)."""
        def name(key: str) -> str:
            return f"pipeline.json's sampling.{key}" if key in from_pipeline else f"--{key.replace('_', '-')}"

        for key in ("cfg", "top_p", "alpha", "beta"):
            v = getattr(self, key)
            if v is not None and not math.isfinite(v):
                raise PopyouError(f"{name(key)} must be a finite number (got {v})")
        if self.cfg is not None and self.cfg < 0:
            raise PopyouError(f"{name('cfg')} must be >= 0 (got {self.cfg}); 0 turns guidance off")
        if self.top_k is not None and self.top_k < 0:
            raise PopyouError(f"{name('top_k')} must be >= 0 (got {self.top_k}); 0 turns it off")
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise PopyouError(f"{name('top_p')} must be in [0, 1] (got {self.top_p}); 0 turns it off")
        if self.cfg_scales is not None and self.cfg_scales < 0:
            raise PopyouError(f"{name('cfg_scales')} must be >= 0 (got {self.cfg_scales})")
        for key in ("alpha", "beta"):  # the condition's weights, bounded as the CLI bounds them
            check_float(name(key), getattr(self, key), -MAX_WEIGHT, MAX_WEIGHT)
        return self

    def resolve(self, defaults: dict, vocab_size: int) -> "SamplingOptions":
        """Every unset option from `defaults`, then from VAR_DEFAULTS; top-k checked against the vocabulary."""
        filled = {f.name: getattr(self, f.name) if getattr(self, f.name) is not None
                  else defaults.get(f.name, VAR_DEFAULTS[f.name]) for f in fields(self)}
        from_pipeline = frozenset(f.name for f in fields(self) if getattr(self, f.name) is None and f.name in defaults)
        opts = replace(self, **filled).check(from_pipeline)
        if opts.top_k > vocab_size:
            if self.top_k is not None:
                raise PopyouError(f"--top-k {opts.top_k} is larger than the vocabulary ({vocab_size} codes)")
            opts.top_k = vocab_size  # the default 900 on a small (tiny) vocabulary
        opts.more_smooth = bool(opts.more_smooth)
        return opts

    def as_dict(self) -> dict:
        return asdict(self)


def seed_or_random(seed: int | None, count: int = 1) -> int:
    """The seed itself, checked for `count` images (seed .. seed + count - 1: bounds.check_seed), or a fresh random
    one for None."""
    if seed is None:
        return random.SystemRandom().randrange(2**31)
    check_seed("--seed", seed, count)
    return int(seed)


def check_counts(n: int, batch_size: int) -> None:
    if n < 1 or batch_size < 1:
        raise PopyouError(f"--n and --batch-size must be at least 1 (got {n} and {batch_size})")


def parse_sweep(spec: str) -> list[float]:
    """START:END:N -> N evenly spaced betas, both ends included."""
    try:
        start, end, count = spec.split(":")
        start, end, count = float(start), float(end), int(count)
    except ValueError:
        raise PopyouError(f"--beta-sweep takes START:END:N, e.g. 0:2.5:11 (got '{spec}')") from None
    if not (math.isfinite(start) and math.isfinite(end)):
        raise PopyouError(f"--beta-sweep START and END must be finite numbers (got '{spec}')")
    if not 2 <= count <= MAX_SWEEP_FRAMES:
        raise PopyouError(f"--beta-sweep needs 2 to {MAX_SWEEP_FRAMES} frames (got {count})")
    return [start + (end - start) * i / (count - 1) for i in range(count)]


def read_prompts(prompts: list[str], prompt_file: Path | None, console=None) -> list[str]:
    """Prompts from the command line and/or a file (one per line). An empty prompt argument is an error; blank
    lines of the file are skipped (prompts.read_prompt_file), and a note on `console` says how many."""
    from popyou_cli.data.prompts import read_prompt_file

    out = []
    for i, p in enumerate(prompts):
        if not p.strip():
            raise PopyouError(f"prompt {i + 1} is empty; give some text, e.g. \"a wizard funko pop\"")
        out.append(p.strip())
    if prompt_file is not None:
        read = read_prompt_file(prompt_file)
        if read.blank_lines and console is not None:
            console.print(f"note: skipped {read.blank_lines} blank line(s) in {prompt_file}", highlight=False,
                          markup=False)
        out += read.prompts
    return out


def check_disk(out: Path, n_images: int, image_size: int) -> None:
    """PNG of noise-like content can be as large as raw pixels; refuse up front rather than fail half-way."""
    need = n_images * 3 * image_size * image_size * 2 + (1 << 20)  # images + grid(s), 1 MiB slack
    free = shutil.disk_usage(out).free
    if need > free:
        raise PopyouError(f"{n_images} images of {image_size}px need up to {need / 2**30:.2f} GiB, but {out} has "
                          f"{free / 2**30:.2f} GiB free; lower --n or choose another --out")
