"""`popyou sample`: class-conditional images from a VAR model, or text-to-image through a pipeline folder
(SigLIP text embedding -> adapter -> cond_delta -> VAR with CFG -> VQ-VAE decode).

Every image has its own seed (a generator per image), so an image does not depend on the batch it was made in:
image k of a prompt uses seed + k, and the same seed on the same kind of device gives the same image.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import runtime
from ..errors import PopyouError
from ..models.checkpoints import load_vqvae
from ..pipeline import load_var_lora


@dataclass
class SamplingOptions:
    cfg: float | None = None  # None: the model's / pipeline's default
    top_k: int | None = None  # None: the default, capped at the model's vocabulary
    top_p: float | None = None
    more_smooth: bool | None = None

    def resolve(self, defaults: dict, vocab_size: int) -> "SamplingOptions":
        """Fills unset options from `defaults` (then VAR's own: cfg 1.5, top-k 900, top-p 0.96) and checks them."""
        pick = lambda name, fallback: getattr(self, name) if getattr(self, name) is not None else defaults.get(name, fallback)  # noqa: E731
        o = SamplingOptions(cfg=pick("cfg", 1.5), top_k=pick("top_k", None), top_p=pick("top_p", 0.96),
                            more_smooth=bool(pick("more_smooth", False)))
        if o.cfg < 0:
            raise PopyouError(f"--cfg must be >= 0 (got {o.cfg}); 0 turns guidance off")
        if o.top_k is not None and o.top_k < 0:
            raise PopyouError(f"--top-k must be >= 0 (got {o.top_k}); 0 turns it off")
        if o.top_k is not None and o.top_k > vocab_size:
            raise PopyouError(f"--top-k {o.top_k} is larger than the vocabulary ({vocab_size} codes)")
        if not 0 <= o.top_p <= 1:
            raise PopyouError(f"--top-p must be in [0, 1] (got {o.top_p}); 0 turns it off")
        o.top_k = min(900, vocab_size) if o.top_k is None else o.top_k
        return o


def _check_counts(n: int, batch_size: int) -> None:
    if n < 1 or batch_size < 1:
        raise PopyouError("--n and --batch-size must be at least 1")


def _check_disk(out: Path, n_images: int, image_size: int) -> None:
    """PNG of noise-like content can be as large as raw pixels; refuse up front rather than fail half-way."""
    need = n_images * 3 * image_size * image_size * 2 + (1 << 20)  # images + grid(s), 1 MiB slack
    free = shutil.disk_usage(out).free
    if need > free:
        raise PopyouError(f"{n_images} images of {image_size}px need up to {need / 2**30:.2f} GiB, but {out} has "
                          f"{free / 2**30:.2f} GiB free; lower --n or choose another --out")


def _generate(var, vqvae, labels, seeds: list[int], opts: SamplingOptions, dev, amp, cond_delta=None,
              alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    gens = [runtime.generator(dev, s) for s in seeds]
    with runtime.autocast(dev, amp):
        img = var.generate(vqvae, len(seeds), labels, cfg=opts.cfg, top_k=opts.top_k, top_p=opts.top_p,
                           more_smooth=opts.more_smooth, generator=gens, cond_delta=cond_delta, alpha=alpha, beta=beta)
    return runtime.to_uint8(img)


def sample_classes(*, var: str, vae: str, class_id: int, n: int, batch_size: int, opts: SamplingOptions,
                   seed: int, device: str, dtype: str, out: Path) -> dict:
    """n images of one class; image k uses seed + k. Returns the written paths."""
    _check_counts(n, batch_size)
    opts.resolve({}, vocab_size=1 << 30)  # option errors before the (slow) model load
    dev = runtime.pick_device(device)
    amp = runtime.pick_dtype(dtype, dev)
    model, meta = load_var_lora(var, device=dev)  # a finetune folder may keep its LoRA separate
    vqvae = load_vqvae(vae, patch_nums=model.config.patch_nums, device=dev)
    if vqvae.config.vocab_size != model.config.vocab_size or vqvae.config.z_channels != model.config.z_channels:
        raise PopyouError(f"the VQ-VAE ({vqvae.config.vocab_size} codes x {vqvae.config.z_channels}) does not fit "
                          f"the VAR ({model.config.vocab_size} x {model.config.z_channels})")
    opts = opts.resolve({}, model.config.vocab_size)
    if not 0 <= class_id < model.config.num_classes:
        raise PopyouError(f"--class-id {class_id} is out of range: this model has classes 0..{model.config.num_classes - 1}")
    runtime.ensure_writable_dir(out)
    _check_disk(out, n, vqvae.config.image_size)

    images, paths = [], []
    for start in range(0, n, batch_size):
        u8 = _generate(model, vqvae, class_id, [seed + k for k in range(start, min(n, start + batch_size))], opts, dev, amp)
        for j in range(len(u8)):
            paths.append(runtime.save_png(u8[j], out / f"class{class_id}_seed{seed + start + j}.png"))
        images.append(u8)
    grid_path = runtime.save_png(runtime.grid(torch.cat(images)), out / f"class{class_id}_grid.png")
    names = meta.get("class_names")
    return {"images": paths, "grid": grid_path, "class_name": names[class_id] if names else None}


def read_prompts(prompts: list[str], prompt_file: Path | None) -> list[str]:
    """Prompts from the command line and/or a file (one per line). Blank prompts are errors, not skipped."""
    out = []
    for i, p in enumerate(prompts):
        if not p.strip():
            raise PopyouError(f"prompt {i + 1} is empty; give some text, e.g. \"a wizard funko pop\"")
        out.append(p.strip())
    if prompt_file is not None:
        try:
            lines = Path(prompt_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise PopyouError(f"cannot read --prompts {prompt_file}: {e.strerror or e}") from None
        while lines and not lines[-1].strip():  # trailing newlines at the end of a file are not prompts
            lines.pop()
        for ln, line in enumerate(lines, 1):
            if not line.strip():
                raise PopyouError(f"{prompt_file} line {ln} is blank; remove blank lines (one prompt per line)")
            out.append(line.strip())
    if not out:
        raise PopyouError("nothing to sample: pass a prompt (or --prompts FILE) with --pipeline, or --class-id N")
    return out


def parse_sweep(spec: str) -> list[float]:
    try:
        start, end, count = spec.split(":")
        start, end, count = float(start), float(end), int(count)
    except ValueError:
        raise PopyouError(f"--beta-sweep takes START:END:N, e.g. 0:2.5:11 (got '{spec}')") from None
    if count < 2:
        raise PopyouError("--beta-sweep needs N >= 2 frames")
    return torch.linspace(start, end, count).tolist()


def sample_text(*, pipeline: str, prompts: list[str], n: int, batch_size: int, opts: SamplingOptions,
                alpha: float | None, beta: float | None, seed: int, device: str, dtype: str, out: Path,
                beta_sweep: str | None = None) -> dict:
    """Text-to-image with a pipeline folder. Writes p{prompt}_seed{seed}.png per image, a grid, samples.jsonl."""
    from ..pipeline import load_pipeline
    from ..encoders import encode_texts

    _check_counts(n, batch_size)
    sweep = parse_sweep(beta_sweep) if beta_sweep else None
    opts.resolve({}, vocab_size=1 << 30)
    dev = runtime.pick_device(device)
    amp = runtime.pick_dtype(dtype, dev)
    pipe = load_pipeline(pipeline, device=dev)
    d = pipe.sampling
    opts = opts.resolve(d, pipe.var.config.vocab_size)
    alpha = d.get("alpha", 1.0) if alpha is None else alpha
    beta = d.get("beta", 1.0) if beta is None else beta
    class_id = int(d.get("class_id", pipe.var.config.num_classes - 1))
    runtime.ensure_writable_dir(out)
    n_images = len(sweep) if sweep else len(prompts) * n
    _check_disk(out, n_images, pipe.vqvae.config.image_size)

    enc_model, _, tokenizer = pipe.load_encoder(device=dev)
    with torch.no_grad():
        delta = pipe.adapter(encode_texts(enc_model, tokenizer, prompts).to(dev))  # (P, C), unit norm
    settings = {**asdict(opts), "alpha": alpha, "beta": beta, "class_id": class_id, "pipeline": str(pipeline)}
    if sweep:
        return _beta_sweep(pipe, prompts[0], delta[:1], sweep, seed, opts, alpha, class_id, dev, amp, out, settings)

    jobs = [(p, k) for p in range(len(prompts)) for k in range(n)]  # prompts are batched together
    records, images = [], []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        u8 = _generate(pipe.var, pipe.vqvae, class_id, [seed + k for _, k in chunk], opts, dev, amp,
                       cond_delta=delta[[p for p, _ in chunk]], alpha=alpha, beta=beta)
        for (p, k), img in zip(chunk, u8):
            path = runtime.save_png(img, out / f"p{p:04d}_seed{seed + k}.png")
            records.append({"prompt_index": p, "prompt": prompts[p], "seed": seed + k, "path": path.name, **settings})
        images.append(u8)
    grid_path = runtime.save_png(runtime.grid(torch.cat(images), ncol=n if len(prompts) > 1 else None), out / "grid.png")
    _write_jsonl(out / "samples.jsonl", records)
    return {"images": [out / r["path"] for r in records], "grid": grid_path, "records": out / "samples.jsonl"}


def _beta_sweep(pipe, prompt, delta, betas, seed, opts, alpha, class_id, dev, amp, out, settings) -> dict:
    """One seed, one prompt, beta from START to END: the interpolation frames, a strip and an animated GIF."""
    from PIL import Image

    frames = []
    for start in range(0, len(betas), 8):
        chunk = betas[start:start + 8]
        scaled = delta.expand(len(chunk), -1) * torch.tensor(chunk, device=dev).unsqueeze(1)  # per-frame beta
        frames.append(_generate(pipe.var, pipe.vqvae, class_id, [seed] * len(chunk), opts, dev, amp,
                                cond_delta=scaled, alpha=alpha, beta=1.0))
    frames = torch.cat(frames)
    records = []
    for i, (b, img) in enumerate(zip(betas, frames)):
        path = runtime.save_png(img, out / f"beta_{i:03d}.png")
        records.append({"prompt": prompt, "seed": seed, "path": path.name, **settings, "beta": b})
    strip = runtime.save_png(runtime.grid(frames, ncol=len(frames)), out / "beta_strip.png")
    gif, tmp = out / "beta_sweep.gif", out / ".beta_sweep.gif.tmp"
    pil = [Image.fromarray(f.numpy()) for f in frames]
    pil[0].save(tmp, format="GIF", save_all=True, append_images=pil[1:] + pil[-2:0:-1], duration=120, loop=0)
    tmp.replace(gif)
    _write_jsonl(out / "samples.jsonl", records)
    return {"images": [out / r["path"] for r in records], "grid": strip, "gif": gif, "records": out / "samples.jsonl"}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
    tmp.replace(path)
