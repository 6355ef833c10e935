"""`popyou sample`: images from a pipeline (text-to-image) or a VAR model (class-conditional), written to a folder.

The generation itself is `Pipeline.__call__` / `Pipeline.beta_sweep`; this stage checks the request, writes one
PNG per image, a grid and samples.jsonl (and for a beta sweep the labelled strip and the MP4).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from popyou_cli.core.formats import SAMPLES_JSONL
from popyou_cli.core.files import atomic_write, portable_spec
from popyou_cli.core.locks import claim_output_folder
from popyou_cli.core.images import grid, image_label, save_png
from popyou_cli.infer.pipeline import Pipeline
from popyou_cli.core.progress import Progress
from popyou_cli.infer.options import SamplingOptions, check_counts, check_disk, parse_sweep, seed_or_random


SWEEP_FPS = 10  # frames per second of a beta sweep's MP4: 11 frames (0:2.5:11) play in about a second
COMMAND = "popyou sample"
CLASS_FILES = re.compile(r"class\d+_(seed\d+|grid)\.png")  # class sampling writes no record: its files' names


@dataclass
class SampleResult:
    out: Path
    images: list[Path]
    grid: Path
    records: Path | None = None
    extras: list[Path] = field(default_factory=list)  # a beta sweep's strip and video
    note: str = ""

    def summary(self) -> str:
        extra = "".join(f", {p}" for p in self.extras)
        rec = f", and {self.records}" if self.records else ""
        return f"wrote {len(self.images)} images{self.note} to {self.out}/, the grid {self.grid}{extra}{rec}"


def _write_grid(images, out: Path, name: str, ncol: int | None = None) -> Path:
    import torch

    u8 = torch.stack([torch.from_numpy(np.array(im)) for im in images])
    labels = [image_label(im.info.get("prompt"), im.info.get("seed")) for im in images]  # beta: one for all
    return save_png(grid(u8, ncol=ncol, labels=labels), out / name)


def sample_classes(*, var: str, vae: str | None, class_id: int, n: int, batch_size: int, opts: SamplingOptions,
                   seed: int, device: str, dtype: str, out: Path, quantize: str | None = None,
                   console=None, fast: bool = False, overwrite: bool = False) -> SampleResult:
    """n images of one class; image k uses seed + k. `out` is locked while it is written; a folder popyou did not
    write is refused unless `overwrite` (which replaces only the files sample writes)."""
    check_counts(n, batch_size)
    seed = seed_or_random(seed, n)
    opts.check()
    pipe = Pipeline.from_model(var, vae, device=device, dtype=dtype, quantize=quantize, fast=fast)
    pipe.options(**opts.as_dict())  # range checks against this model before any file is written
    pipe._check_class(class_id)
    with claim_output_folder(out, command=COMMAND, own_names=CLASS_FILES, overwrite=overwrite):
        check_disk(out, n, pipe.image_size)
        with Progress("sample", n, console=console) as progress:
            images = pipe(None, n=n, seed=seed, class_id=class_id, batch_size=batch_size,
                          on_image=lambda done, _: progress.update(done), **opts.as_dict())
        paths = [save_png(np.asarray(im), out / f"class{class_id}_seed{im.info['seed']}.png") for im in images]
        grid_path = _write_grid(images, out, f"class{class_id}_grid.png")
    names = pipe.config.get("class_names")
    note = f" of class {class_id}" + (f" ({names[class_id]})" if names else "")
    return SampleResult(out, paths, grid_path, note=note)


def sample_text(*, pipeline: str | None, prompts: list[str], n: int, batch_size: int, opts: SamplingOptions,
                seed: int, device: str, dtype: str, out: Path, beta_sweep: str | None = None,
                quantize: str | None = None, console=None, fast: bool = False, overwrite: bool = False) -> SampleResult:
    """Text-to-image. Writes p{prompt}_seed{seed}.png per image, a grid and samples.jsonl, with `out` locked; a
    folder popyou did not write is refused unless `overwrite` (which replaces only the files sample writes)."""
    check_counts(n, batch_size)
    seed = seed_or_random(seed, n)
    sweep = parse_sweep(beta_sweep) if beta_sweep else None
    opts.check()
    pipe = Pipeline.from_pretrained(pipeline, device=device, dtype=dtype, quantize=quantize, fast=fast)
    resolved = pipe.options(**opts.as_dict())
    with claim_output_folder(out, command=COMMAND, overwrite=overwrite):
        check_disk(out, len(sweep) if sweep else len(prompts) * n, pipe.image_size)
        return _text_images(pipe, prompts, n, seed, opts, resolved, batch_size, out, sweep, console)


def _text_images(pipe: Pipeline, prompts: list[str], n: int, seed: int, opts: SamplingOptions,
                 resolved: SamplingOptions, batch_size: int, out: Path, sweep: list[float] | None,
                 console) -> SampleResult:
    """The text-to-image images and their records (or a beta sweep's frames), into `out` (locked)."""
    # A local pipeline is recorded relative to OUT (samples.jsonl is shared and uploaded), a Hub id as it is.
    settings = {**resolved.as_dict(), "class_id": pipe.class_id, "pipeline": portable_spec(pipe.source, out),
                **pipe.speed_record}
    if sweep:
        return _beta_sweep(pipe, prompts[0], sweep, seed, opts, batch_size, out, settings, console)
    with Progress("sample", len(prompts) * n, console=console) as progress:
        images = pipe(prompts, n=n, seed=seed, batch_size=batch_size, on_image=lambda done, _: progress.update(done),
                      **opts.as_dict())
    records, paths = [], []
    for im in images:
        p = im.info["prompt_index"]
        paths.append(save_png(np.asarray(im), out / f"p{p:04d}_seed{im.info['seed']}.png"))
        records.append({"prompt_index": p, "prompt": prompts[p], "seed": im.info["seed"], "path": paths[-1].name,
                        **settings})
    grid_path = _write_grid(images, out, "grid.png", ncol=n if len(prompts) > 1 else None)
    return SampleResult(out, paths, grid_path, _write_jsonl(out / SAMPLES_JSONL, records))


def _beta_sweep(pipe: Pipeline, prompt: str, betas: list[float], seed: int, opts: SamplingOptions, batch_size: int,
                out: Path, settings: dict, console=None) -> SampleResult:
    """One seed, one prompt, beta from START to END: the frames, the labelled strip and the MP4 (the demo's code)."""
    from popyou_cli.infer.video import write_beta_sweep

    given = {k: v for k, v in opts.as_dict().items() if k != "beta"}
    with Progress("sample", len(betas), console=console, unit="frames") as progress:
        frames = pipe.beta_sweep(prompt, betas, seed=seed, batch_size=batch_size,
                                 on_frame=lambda done, _: progress.update(done), **given)
    records, paths = [], []
    for i, (b, im) in enumerate(zip(betas, frames)):
        paths.append(save_png(np.asarray(im), out / f"beta_{i:03d}.png"))
        records.append({"prompt": prompt, "seed": seed, "path": paths[-1].name, **settings, "beta": b})
    mp4, strip = write_beta_sweep(frames, betas, out / "beta_sweep.mp4", fps=SWEEP_FPS)
    strip_path = save_png(strip, out / "beta_strip.png")
    return SampleResult(out, paths, strip_path, _write_jsonl(out / SAMPLES_JSONL, records), extras=[mp4])


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    atomic_write(path, "".join(json.dumps(r, default=str) + "\n" for r in records))
    return path
