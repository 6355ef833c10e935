"""`popyou sample`: images from a VAR model (class-conditional here; text prompts through a pipeline later)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PopyouError
from ..models.checkpoints import load_var, load_vqvae
from .. import runtime


@dataclass
class SamplingOptions:
    cfg: float = 1.5
    top_k: int | None = None  # None: the reference's 900, capped at the model's vocabulary
    top_p: float = 0.96
    more_smooth: bool = False

    def validate(self, vocab_size: int | None = None) -> None:
        if self.cfg < 0:
            raise PopyouError(f"--cfg must be >= 0 (got {self.cfg}); 0 turns guidance off")
        if self.top_k is not None and self.top_k < 0:
            raise PopyouError(f"--top-k must be >= 0 (got {self.top_k}); 0 turns it off")
        if vocab_size is not None and self.top_k is not None and self.top_k > vocab_size:
            raise PopyouError(f"--top-k {self.top_k} is larger than the vocabulary ({vocab_size} codes)")
        if not 0 <= self.top_p <= 1:
            raise PopyouError(f"--top-p must be in [0, 1] (got {self.top_p}); 0 turns it off")


def sample_classes(*, var: str, vae: str, class_id: int, n: int, batch_size: int, opts: SamplingOptions,
                   seed: int, device: str, dtype: str, out: Path, progress=None) -> dict:
    """Generates n images of one class. Batch b uses the generator seeded with seed + b, so the same seed and
    batch size give the same images on the same kind of device. Returns the written paths."""
    if n < 1 or batch_size < 1:
        raise PopyouError("--n and --batch-size must be at least 1")
    opts.validate()
    dev = runtime.pick_device(device)
    amp = runtime.pick_dtype(dtype, dev)
    model, meta = load_var(var, device=dev)
    vqvae = load_vqvae(vae, patch_nums=model.config.patch_nums, device=dev)
    if vqvae.config.vocab_size != model.config.vocab_size or vqvae.config.z_channels != model.config.z_channels:
        raise PopyouError(f"the VQ-VAE ({vqvae.config.vocab_size} codes x {vqvae.config.z_channels}) does not fit "
                          f"the VAR ({model.config.vocab_size} x {model.config.z_channels})")
    opts.validate(model.config.vocab_size)
    if opts.top_k is None:
        opts.top_k = min(900, model.config.vocab_size)
    if not 0 <= class_id < model.config.num_classes:
        raise PopyouError(f"--class-id {class_id} is out of range: this model has classes 0..{model.config.num_classes - 1}")
    runtime.ensure_writable_dir(out)

    images, paths = [], []
    for b, start in enumerate(range(0, n, batch_size)):
        bs = min(batch_size, n - start)
        with runtime.autocast(dev, amp):
            img = model.generate(vqvae, bs, class_id, cfg=opts.cfg, top_k=opts.top_k, top_p=opts.top_p,
                                 more_smooth=opts.more_smooth, generator=runtime.generator(dev, seed + b))
        u8 = runtime.to_uint8(img)
        for j in range(bs):
            paths.append(runtime.save_png(u8[j], out / f"class{class_id}_seed{seed}_{start + j:05d}.png"))
        images.append(u8)
        if progress is not None:
            progress(bs)
    grid_path = runtime.save_png(runtime.grid(torch.cat(images)), out / f"class{class_id}_seed{seed}_grid.png")
    names = meta.get("class_names")
    return {"images": paths, "grid": grid_path, "class_name": names[class_id] if names else None}
