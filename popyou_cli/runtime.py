"""Small shared helpers for stages: device and dtype choice, seeded generators, image files written atomically."""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import torch

from .errors import PopyouError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PopyouError(f"unknown device '{device}' (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PopyouError(f"--device {device} asked for, but no CUDA GPU is visible")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise PopyouError(f"unknown dtype '{dtype}' (use auto, fp32, bf16 or fp16)")
    return DTYPES[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for matmuls; embeddings, sampling and the f_hat sum stay in fp32 inside the models."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on the model's device: the same seed gives the same samples on that kind of device."""
    return torch.Generator(device=device).manual_seed(seed)


def ensure_writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".popyou-write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PopyouError(f"cannot write to {path}: {e.strerror or e}") from None
    return path


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 on CPU, rounded to nearest."""
    return images.float().mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_png(array_hw3, path: Path) -> Path:
    """Writes under a temporary name and renames, so a PNG that exists is complete."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array_hw3.numpy() if hasattr(array_hw3, "numpy") else array_hw3).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def grid(images_u8: torch.Tensor, ncol: int | None = None, pad: int = 2) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> one (rows*H, cols*W, 3) image with white gaps."""
    n, h, w, _ = images_u8.shape
    ncol = ncol or min(n, max(1, round(n**0.5 + 0.49)))
    nrow = -(-n // ncol)
    out = torch.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images_u8[i]
    return out
