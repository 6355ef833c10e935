"""Where and in what precision popyou computes: the one parser for --device and --dtype, and the one rule per
purpose for what `auto` means.

Dtype names: fp32 / float32 / float, fp16 / float16 / half, bf16 / bfloat16, and auto. `auto` means:

- "sample" (VAR + VQ-VAE inference, the demo, eval's generation): bf16 autocast on CUDA (VAR keeps its
  embeddings, sampling and the f_hat sum in fp32 itself), fp32 on CPU (exact, and as fast there);
- "data" (SDXL-Turbo, BLIP-2, SigLIP in gen-data / caption / encode): fp16 on CUDA (SDXL-Turbo ships an fp16
  variant and BLIP-2 is run so), fp32 on CPU;
- "train" (accelerate's mixed precision): bf16 on CUDA when the GPU supports it, else fp16; none on CPU.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import PopyouError

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")  # the spellings shown in --help; aliases below also parse
_ALIASES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
SHORT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """auto/None: CUDA when visible, else CPU. Refuses a CUDA device on a machine without one, in one line."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PopyouError(f"unknown device '{device}' (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PopyouError(f"--device {device} asked for, but no CUDA GPU is visible")
    return dev


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from any accepted spelling; None for auto (resolved later by `resolve_dtype`)."""
    if isinstance(name, torch.dtype) or name is None:
        return name
    key = str(name).lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in _ALIASES:
        raise PopyouError(f"unknown dtype '{name}' (use auto, fp32, bf16 or fp16)")
    return _ALIASES[key]


def resolve_dtype(name: str | torch.dtype | None, device: torch.device, purpose: str = "sample") -> torch.dtype:
    """The dtype for `purpose` ("sample", "data" or "train") on `device`, with auto resolved by the rules above."""
    dtype = parse_dtype(name)
    if dtype is not None:
        return dtype
    if device.type != "cuda":
        return torch.float32
    if purpose == "data":
        return torch.float16
    if purpose == "train" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def dtype_name(dtype: torch.dtype) -> str:
    """fp32 / fp16 / bf16: the short name popyou writes into manifests and reports."""
    return SHORT_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for matmuls; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on the model's device: the same seed gives the same samples on that kind of device."""
    return torch.Generator(device=device).manual_seed(seed)
