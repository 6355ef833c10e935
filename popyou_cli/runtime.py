"""Deprecated: the names that sample.py, evaluate.py and bench.py still import from here, re-exported from their
homes (devices.py, images.py, files.py). Removed once those import them directly."""
from __future__ import annotations

import torch

from .devices import autocast, generator, resolve_device as pick_device
from .files import ensure_writable_dir
from .images import grid, save_png, to_uint8

__all__ = ["autocast", "ensure_writable_dir", "generator", "grid", "pick_device", "pick_dtype", "save_png",
           "to_uint8"]


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """devices.resolve_dtype for sampling (auto: bf16 on CUDA, fp32 on CPU)."""
    from .devices import resolve_dtype

    return resolve_dtype(dtype, device, "sample")
