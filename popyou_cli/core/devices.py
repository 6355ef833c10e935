"""Where and in what precision popyou computes: the one parser for --device and --dtype, and the one rule per
purpose for what `auto` means.

Dtype names: fp32 / float32 / float, fp16 / float16 / half, bf16 / bfloat16, and auto. `auto` means:

- "sample" (VAR + VQ-VAE inference, the demo, eval's generation): bf16 autocast on CUDA (VAR keeps its
  embeddings, sampling and the f_hat sum in fp32 itself), fp32 on CPU (exact, and as fast there);
- "data" (SDXL-Turbo, BLIP-2, SigLIP in gen-data / caption / encode): fp16 on CUDA (SDXL-Turbo ships an fp16
  variant and BLIP-2 is run so), fp32 on CPU;
- "train" (accelerate's mixed precision): bf16 on CUDA when the GPU supports it, else fp16; none on CPU.

Building a model whose weights are loaded next (`on_meta`): on the meta device, with no initialiser run.

What the CPU can do (`cpu_info`): its model name and the instruction sets that decide which sampling mode is fast
on it (AMX, AVX512-BF16, VNNI, AVX2, from /proc/cpuinfo).
"""
from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from popyou_cli.core.errors import PopyouError
from popyou_cli.core.presets import DTYPE_ALIASES

_BY_NAME = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # presets.DTYPES but auto
SHORT_NAMES = {dtype: name for name, dtype in _BY_NAME.items()}
_ALIASES = {**_BY_NAME, **{alias: _BY_NAME[name] for alias, name in DTYPE_ALIASES.items()}}


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


# ------------------------------------------------------------------------------------------ building on meta
# What reset_parameters runs while a module is built (nn.init's functions and the Tensor methods they call). On
# the meta device they compute nothing, and normal_ goes through torch._refs, whose first call imports
# torch._dynamo: 2 s of a 64 px sample's start-up.
_INITIALISERS = frozenset({
    "normal_", "uniform_", "trunc_normal_", "fill_", "zero_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
    "random_", "exponential_", "bernoulli_", "log_normal_", "geometric_", "cauchy_",
})


class _SkipInitialisersOnMeta(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _INITIALISERS:
            target = args[0] if args else kwargs.get("tensor")  # nn.init passes its tensor by keyword
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta():
    """Modules built inside have their parameters and buffers on the meta device, with no initialiser run: build,
    then load_state_dict(..., assign=True). As `with torch.device("meta")`, without importing torch._dynamo."""
    with torch.device("meta"), _SkipInitialisersOnMeta():
        yield


# ------------------------------------------------------------------------------------------ CPU features
# The /proc/cpuinfo flags that decide which sampling mode is fast: bf16 dot products (AVX512-BF16, AMX), int8 dot
# products (VNNI: oneDNN's int8 GEMM), and the vector width oneDNN and MKL run fp32 at.
CPU_FEATURES = {"AMX": ("amx_bf16", "amx_int8", "amx_tile"), "AVX512-BF16": ("avx512_bf16",),
                "VNNI": ("avx512_vnni", "avx_vnni"), "AVX512": ("avx512f",), "AVX2": ("avx2",), "FMA": ("fma",)}


# $ONEDNN_MAX_CPU_ISA caps the instructions oneDNN (popyou's GEMMs and convolutions) may use; flags above the cap
# are dropped, so that --fast measures and caches what the capped kernels can do (BENCHMARKS.md emulates a CPU
# without bf16 dot products this way). Each oneDNN ISA name -> the flags it allows.
_ISA_FLAGS = [("SSE41", set()), ("AVX", set()), ("AVX2", {"avx2", "fma"}), ("AVX2_VNNI", {"avx_vnni"}),
              ("AVX512_CORE", {"avx512f"}), ("AVX512_CORE_VNNI", {"avx512_vnni"}),
              ("AVX512_CORE_BF16", {"avx512_bf16"}), ("AVX512_CORE_FP16", set()), ("AVX10_1_512", set()),
              ("AVX512_CORE_AMX", {"amx_bf16", "amx_int8", "amx_tile"})]


def _allowed_by_isa_cap(flags: set, cap: str | None) -> set:
    names = [name for name, _ in _ISA_FLAGS]
    cap = (cap or "").strip().upper().removesuffix("_2")  # AVX2_VNNI_2 allows what AVX2_VNNI does, and more
    if cap not in names:  # unset, ALL, or a name popyou does not rank: no cap
        return flags
    allowed = set().union(*(f for _, f in _ISA_FLAGS[:names.index(cap) + 1]))
    ranked = set().union(*(f for _, f in _ISA_FLAGS))
    return {f for f in flags if f in allowed or f not in ranked}


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset  # the CPU_FEATURES flags this CPU has

    @property
    def native_bf16(self) -> bool:
        """bf16 pays on a CPU only with bf16 dot-product instructions (AVX512-BF16 or AMX)."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16"})

    def summary(self) -> str:
        """"AMD EPYC: AMX no, AVX512-BF16 yes, VNNI yes (avx512_vnni), ..." """
        parts = []
        for name, flags in CPU_FEATURES.items():
            have = [f for f in flags if f in self.flags]
            detail = f" ({', '.join(have)})" if len(flags) > 1 and have else ""
            parts.append(f"{name} {'yes' if have else 'no'}{detail}")
        return f"{self.model}: " + ", ".join(parts)


def cpu_info(cpuinfo: str | None = None) -> CpuInfo:
    """This machine's CPU (`cpuinfo`: the text of /proc/cpuinfo, read when None; empty where there is none), less
    the flags $ONEDNN_MAX_CPU_ISA forbids."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and not model:
            model = value
        elif key == "flags" and not flags:
            flags = set(value.split())
    known = {f for group in CPU_FEATURES.values() for f in group}
    flags = _allowed_by_isa_cap(flags & known, os.environ.get("ONEDNN_MAX_CPU_ISA"))
    return CpuInfo(model or platform.processor() or "unknown CPU", frozenset(flags))
