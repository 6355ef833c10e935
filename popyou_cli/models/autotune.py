"""Which kernels exact mode uses and which mode `--fast` picks, on this machine: a short measurement on the model's
real shapes, done once and cached.

`--fast` picks the fastest documented mode whose lowest per-scale token agreement with exact mode on the golden
tiny10 model is at least 90% (BENCHMARKS.md: `--quantize int8` 0.955, `--dtype bf16` 0.976, both 0.945;
`--cfg-scales 8`, 0.42, is no candidate). On CUDA nothing is measured: --fast is bf16 with CUDA graphs (popyou's
default there). $POPYOU_FAST_MODE (exact, int8, bf16 or bf16+int8) forces the pick; $POPYOU_EXACT_KERNELS (e.g.
"gemm=plain,upsample=nearest", see models.fast.Kernels) forces exact mode's kernels.

The measurement (CPU, `measure`; every case called once untimed, then timed in 5 rounds over all cases; each case's
fastest round counts, the one least disturbed by other programs):
- one transformer block at the model's width, on the largest scale's tokens of one image with guidance (2 rows),
  attending over the whole KV cache: MKL's GEMM, oneDNN's, oneDNN's with the GELU fused (exact mode's choices),
  int8, and where the CPU has bf16 dot products (AVX512-BF16, AMX) bf16 and bf16 + int8, each of these two with
  PyTorch's fused attention kernel and with the unfused one (models/var.py; the faster counts);
- the decoder's heaviest convolution at its real size: fp32 in NCHW, in channels_last and (where NNPACK runs)
  through Winograd, each with the GroupNorm of its input as that layout runs it (exact mode's channels_last needs
  models.fast_decoder.TwoPassGroupNorm), and (bf16 CPUs) bf16 in NCHW and in channels_last;
- the decoder's largest upsampling: nearest + 3x3 conv against sub-pixel.
A mode's seconds per image are estimated as depth x block x (all tokens / the largest scale's) + heaviest conv x
(the decoder's multiply-adds / that conv's), with Winograd's time for the share of the multiply-adds it takes
and oneDNN's NCHW time for the rest. It takes a few seconds for VAR-d16 on 2 cores, a fraction of one for
the tiny models, and is cached in `cache_root()/sampling-autotune.json`: one entry per CPU model + flags + torch
version + threads + model shape. A missing or unreadable cache is measured again and rewritten.

A busy machine skews the pick (another program slows some kernels more than others: a measurement taken under
load cached bf16 as faster than bf16 + int8 here, the reverse of the idle truth). So the measurement also records
the share of the CPUs popyou got while timing (process CPU time / (wall time x threads): 0.98 idle, 0.61 beside one
busy process on 2 cores). Below BUSY_SHARE the pick is used for this run but not trusted: the next run measures
again, up to BUSY_RETRIES times, after which the last busy pick is kept (a machine that is always busy still gets
one cached answer).
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from popyou_cli.core import devices
from popyou_cli.core.errors import PopyouError
from popyou_cli.models.fast import (DEFAULT_KERNELS, Kernels, onednn_int8_available, onednn_linear_available,
                          prepare_for_sampling)

FAST_MODE_ENV = "POPYOU_FAST_MODE"
KERNELS_ENV = "POPYOU_EXACT_KERNELS"
MIN_AGREEMENT = 0.9  # a --fast candidate keeps at least this share of exact mode's tokens at every scale
CACHE_FILE = "sampling-autotune.json"
CACHE_VERSION = 4  # 2: fastest rounds, the CPU share, the attention kernel; 3: the fp32 decoder layout; 4: Winograd
REPEATS = 5  # timed rounds over every case, after one untimed call of each; each case's fastest round counts
BUSY_SHARE = 0.8  # below this share of the CPUs during the measurement, the machine was busy (module docstring)
BUSY_RETRIES = 3  # busy measurements before one is kept anyway

Timer = Callable[[str, Callable[[], object]], float]  # (case label, the call) -> seconds of one call


@dataclass(frozen=True)
class SpeedMode:
    """A documented sampling mode and its distance from exact mode (BENCHMARKS.md, tiny10 greedy)."""
    name: str
    dtype: torch.dtype
    quantize: str | None
    agreement: float  # the lowest per-scale token agreement with exact mode
    cfg_scales: int | None = None

    @property
    def candidate(self) -> bool:
        """Whether --fast may pick it."""
        return self.agreement >= MIN_AGREEMENT and self.cfg_scales is None

    @property
    def flags(self) -> list[str]:
        """The sample / eval / demo flags that select it on a CPU."""
        out = ["--dtype", devices.dtype_name(self.dtype)] if self.dtype != torch.float32 else []
        out += ["--quantize", self.quantize] if self.quantize else []
        return out + (["--cfg-scales", str(self.cfg_scales)] if self.cfg_scales is not None else [])


MODES = (SpeedMode("exact", torch.float32, None, 1.0), SpeedMode("int8", torch.float32, "int8", 0.955),
         SpeedMode("bf16", torch.bfloat16, None, 0.976), SpeedMode("bf16+int8", torch.bfloat16, "int8", 0.945),
         SpeedMode("cfg-scales 8", torch.float32, None, 0.422, cfg_scales=8))
FAST_CHOICES = tuple(m.name for m in MODES if m.candidate)


def mode_named(name: str) -> SpeedMode:
    for m in MODES:
        if m.name == name and m.candidate:
            return m
    raise PopyouError(f"unknown fast mode '{name}' (use {', '.join(FAST_CHOICES)})")


def fastest(estimates: dict[str, float]) -> str:
    """The candidate with the fewest estimated seconds; modes below MIN_AGREEMENT never win."""
    allowed = {name: s for name, s in estimates.items() if any(m.name == name and m.candidate for m in MODES)}
    if not allowed:
        raise PopyouError(f"no --fast candidate among the measured modes {sorted(estimates)}")
    return min(allowed, key=allowed.get)


@dataclass
class Tuning:
    """What the measurement chose, and from which numbers."""
    kernels: Kernels  # exact mode's kernels
    fast_mode: str  # what --fast picks
    estimates_s: dict  # mode -> estimated seconds per image
    timings_ms: dict  # case -> fastest milliseconds of one call
    seconds: float  # how long the measurement took
    cpu_share: float = 1.0  # the share of the CPUs popyou got while timing (module docstring)
    busy_tries: int = 0  # how many busy measurements this entry has seen (0: taken on an idle machine)

    @property
    def busy(self) -> bool:
        return self.cpu_share < BUSY_SHARE

    @property
    def settled(self) -> bool:
        """Whether to reuse it: measured idle, or busy BUSY_RETRIES times (module docstring)."""
        return not self.busy or self.busy_tries >= BUSY_RETRIES

    def as_dict(self) -> dict:
        return {**asdict(self), "kernels": self.kernels.as_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Tuning":
        """Raises (KeyError, TypeError, ValueError, PopyouError) on an entry that is not one."""
        tuning = cls(Kernels(**d["kernels"]), mode_named(d["fast_mode"]).name, dict(d["estimates_s"]),
                     dict(d["timings_ms"]), float(d["seconds"]), float(d.get("cpu_share", 1.0)),
                     int(d.get("busy_tries", 0)))
        if not all(isinstance(getattr(tuning.kernels, flag), bool) for flag in ("fused_gelu", "channels_last")):
            raise ValueError("kernel flags are not booleans")
        return tuning

    def summary(self) -> str:
        est = ", ".join(f"{m} {s:.3g} s" for m, s in sorted(self.estimates_s.items(), key=lambda kv: kv[1]))
        busy = f", on a busy machine: popyou got {self.cpu_share:.0%} of the CPUs" if self.busy else ""
        return (f"exact-mode kernels {self.kernels.spelled()}; --fast picks {self.fast_mode} (estimated s/image: "
                f"{est}; measured in {self.seconds:.1f} s{busy})")


# ------------------------------------------------------------------------------------------ the choices
def check_fast(fast: bool, dtype, quantize) -> None:
    """fast=True picks the dtype and quantize itself: both must be left at their defaults."""
    if fast and (quantize is not None or dtype not in (None, "auto")):
        raise PopyouError("--fast picks --dtype and --quantize itself: drop --dtype/--quantize, or drop --fast")


def exact_kernels(var, vqvae, device: torch.device, timer: Timer | None = None) -> Kernels:
    """$POPYOU_EXACT_KERNELS, else on a CPU the measured choice, else the defaults."""
    return _kernels(device, lambda: tune(var, vqvae, timer))


def fast_mode(var, vqvae, device: torch.device, timer: Timer | None = None) -> SpeedMode:
    """$POPYOU_FAST_MODE, else on a CPU the measured pick, else bf16 (with CUDA graphs on CUDA)."""
    return _fast_mode(device, lambda: tune(var, vqvae, timer))


def _kernels(device: torch.device, tuned: Callable[[], Tuning]) -> Kernels:
    if os.environ.get(KERNELS_ENV):
        try:
            return Kernels.parse(os.environ[KERNELS_ENV])
        except PopyouError as e:
            raise PopyouError(f"${KERNELS_ENV}: {e}") from None
    return tuned().kernels if device.type == "cpu" else DEFAULT_KERNELS


def _fast_mode(device: torch.device, tuned: Callable[[], Tuning]) -> SpeedMode:
    if os.environ.get(FAST_MODE_ENV):
        try:
            return mode_named(os.environ[FAST_MODE_ENV].strip().lower())
        except PopyouError as e:
            raise PopyouError(f"${FAST_MODE_ENV}: {e}") from None
    return mode_named(tuned().fast_mode if device.type == "cpu" else "bf16")


@dataclass
class Plan:
    dtype: torch.dtype
    quantize: str | None
    fast_mode: str | None  # what --fast picked; None without --fast
    kernels: Kernels
    graphs: object | None = None  # the SamplingGraphs to pass to generate (CUDA)


def prepare(var, vqvae, device: torch.device, dtype: torch.dtype, *, quantize: str | None = None,
            fast: bool = False, timer: Timer | None = None) -> Plan:
    """Chooses (measuring at most once, the first time on this machine) and applies, in place: exact mode's
    kernels, and with `fast` the mode."""
    tuned = functools.cache(lambda: tune(var, vqvae, timer))
    picked = _fast_mode(device, tuned) if fast else None
    if picked is not None:
        dtype, quantize = picked.dtype, picked.quantize
    kernels = _kernels(device, tuned)
    graphs = prepare_for_sampling(var, vqvae, device, dtype, quantize=quantize, kernels=kernels)
    return Plan(dtype, quantize, picked.name if picked is not None else None, kernels, graphs)


# ------------------------------------------------------------------------------------------ the cache
def cache_key(var, vqvae, cpu: devices.CpuInfo | None = None) -> str:
    cpu = cpu or devices.cpu_info()
    c, v = var.config, vqvae.config
    shape = (f"VAR depth {c.depth} width {c.embed_dim} heads {c.num_heads} tokens {c.L} last scale "
             f"{c.patch_nums[-1]}; VQ-VAE ch {v.ch} x {list(v.ch_mult)} {v.image_size} px")
    return (f"{cpu.model} | {','.join(sorted(cpu.flags))} | torch {torch.__version__} | "
            f"threads {torch.get_num_threads()} | {shape}")


def cache_path() -> Path:
    from popyou_cli.core.files import cache_root

    return cache_root() / CACHE_FILE


def _read_entries(path: Path) -> dict:
    """The cache's entries; {} for a missing, unreadable or foreign file (it is rewritten after measuring)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict)
    return data["entries"] if ok else {}


def _entry(key: str) -> Tuning | None:
    """The cache's entry for key; None where there is none or it is unreadable."""
    entry = _read_entries(cache_path()).get(key)
    try:
        return Tuning.from_dict(entry) if entry is not None else None
    except (KeyError, TypeError, ValueError, AttributeError, PopyouError):
        return None


def cached(key: str) -> Tuning | None:
    """The entry for key; None where there is none, it is unreadable, or it was measured on a busy machine fewer
    than BUSY_RETRIES times (measure again)."""
    found = _entry(key)
    return found if found is not None and found.settled else None


def tune(var, vqvae, timer: Timer | None = None) -> Tuning:
    """The cached choice for this machine and model shape, else a measurement (then cached)."""
    key = cache_key(var, vqvae)
    earlier = _entry(key)
    if earlier is not None and earlier.settled:
        return earlier
    tuning = measure(var, vqvae, timer or time_call)
    if tuning.busy:
        tuning.busy_tries = (earlier.busy_tries if earlier is not None else 0) + 1
        again = "measuring again next time" if tuning.busy_tries < BUSY_RETRIES else "kept: it stays busy"
        warnings.warn(f"the machine was busy while popyou measured its sampling kernels (it got "
                      f"{tuning.cpu_share:.0%} of the CPUs); using {tuning.fast_mode} now, {again}",
                      RuntimeWarning, stacklevel=2)
    path = cache_path()
    entries = _read_entries(path)  # read again: another process may have added its own model's entry
    entries[key] = tuning.as_dict()
    try:
        from popyou_cli.core.files import atomic_write_json

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"version": CACHE_VERSION, "entries": entries})
    except (OSError, PopyouError) as e:
        warnings.warn(f"could not write {path} ({e}); the sampling kernels are measured again next time",
                      RuntimeWarning, stacklevel=2)
    return tuning


def cpu_share(wall_s: float, cpu_s: float, threads: int) -> float:
    """The share of `threads` CPUs this process used over wall_s seconds (1.0 for a span too short to tell)."""
    return 1.0 if wall_s < 0.05 else min(1.0, cpu_s / (wall_s * max(threads, 1)))


def time_call(label: str, fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(var, vqvae, timer: Timer = time_call, cpu: devices.CpuInfo | None = None) -> Tuning:
    """Times the cases of the module docstring on the (unprepared) CPU models and returns the choices. Every case
    is called once untimed (first-call setup, the allocator), then REPEATS rounds time every case in turn, so that
    another program's load hits all of them alike; each case's fastest round counts. Records the CPU share."""
    from popyou_cli.models.autotune_cases import block_case, conv_cases, upsample_cases

    cpu, start = cpu or devices.cpu_info(), time.perf_counter()
    int8 = onednn_int8_available()
    exact = {"plain": Kernels(gemm="plain")}
    if onednn_linear_available():
        exact.update({"onednn": Kernels(fused_gelu=False), "onednn+gelu": DEFAULT_KERNELS})
    cases = {f"block {name}": block_case(var, torch.float32, None, k) for name, k in exact.items()}
    modes = {"exact": torch.float32} | ({"int8": torch.float32} if int8 else {})
    if cpu.native_bf16:
        modes |= {"bf16": torch.bfloat16} | ({"bf16+int8": torch.bfloat16} if int8 else {})
    fused_attention = replace(DEFAULT_KERNELS, attention="fused")
    for name in modes:  # int8 and bf16 replace every Linear of the block: exact's kernel choice is moot there
        if name != "exact":  # reduced precision: once with each attention kernel ("block NAME" is the fused one)
            quantize = mode_named(name).quantize
            cases[f"block {name}"] = block_case(var, modes[name], quantize, fused_attention)
            if modes[name] != torch.float32:
                cases[f"block {name} {UNFUSED}"] = block_case(var, modes[name], quantize, DEFAULT_KERNELS)
    convs, conv_shares = conv_cases(vqvae, bf16=cpu.native_bf16)
    cases |= convs
    cases |= {f"upsample {k}": fn for k, fn in upsample_cases(vqvae).items()}
    for label, fn in cases.items():
        timer(label, fn)
    runs = {label: [] for label in cases}
    wall, cpu_time = time.perf_counter(), time.process_time()
    for _ in range(REPEATS):
        for label, fn in cases.items():
            runs[label].append(timer(label, fn))
    share = cpu_share(time.perf_counter() - wall, time.process_time() - cpu_time, torch.get_num_threads())
    ms = {label: round(1000 * min(times), 4) for label, times in runs.items()}

    best = min(exact, key=lambda name: ms[f"block {name}"])
    channels_last = (ms["conv bf16 channels_last"] <= ms["conv bf16 nchw"] if "conv bf16 nchw" in ms
                     else DEFAULT_KERNELS.channels_last)
    bf16_conv = "conv bf16 channels_last" if channels_last else "conv bf16 nchw"
    fp32_costs = {"channels_last": ms["conv fp32 channels_last"] + ms["norm fp32 channels_last"],
                  "nchw": ms["conv fp32"] + ms["norm fp32 nchw"]}
    if "conv fp32 winograd" in ms:
        fp32_costs["winograd"] = ms["conv fp32 winograd"] + ms["norm fp32 nchw"]
    fp32_choice = min(fp32_costs, key=fp32_costs.get)  # ties keep the first: channels_last
    if fp32_choice == "winograd":  # Winograd takes the large maps' convs only; the rest run oneDNN in NCHW
        winograd = conv_shares["winograd"]
        fp32_decoder = ms["conv fp32 winograd"] * winograd + ms["conv fp32"] * (conv_shares["all"] - winograd)
    else:
        conv = ms["conv fp32 channels_last" if fp32_choice == "channels_last" else "conv fp32"]
        fp32_decoder = conv * conv_shares["all"]
    ups = {k: ms[f"upsample {k}"] for k in ("subpixel", "nearest") if f"upsample {k}" in ms}
    c = var.config
    blocks = c.depth * c.L / c.patch_nums[-1] ** 2  # blocks x (all tokens / the largest scale's tokens)
    estimates = {}
    for name, dtype in modes.items():
        block = ms[f"block {best}"] if name == "exact" else min(ms.get(f"block {name}{a}", math.inf)
                                                                for a in ("", f" {UNFUSED}"))
        decoder = fp32_decoder if dtype == torch.float32 else ms[bf16_conv] * conv_shares["all"]
        estimates[name] = round((block * blocks + decoder) / 1000, 4)
    pick = fastest(estimates)
    kernels = Kernels(gemm=exact[best].gemm, fused_gelu=exact[best].fused_gelu,
                      upsample=min(ups, key=ups.get) if ups else DEFAULT_KERNELS.upsample,
                      channels_last=channels_last, attention=_attention(ms, pick),
                      fp32_conv=fp32_choice)
    return Tuning(kernels, pick, estimates, ms, round(time.perf_counter() - start, 2), round(share, 3))


UNFUSED = "unfused attention"  # the label suffix of a reduced-precision block timed with unfused attention


def _attention(ms: dict, pick: str) -> str:
    """The attention kernel of reduced precision: the faster one in the picked mode's block, else in the first
    reduced-precision mode measured; the default where none was (a CPU without bf16 dot products)."""
    for name in (pick, "bf16+int8", "bf16"):
        if f"block {name} {UNFUSED}" in ms:
            return "unfused" if ms[f"block {name} {UNFUSED}"] <= ms[f"block {name}"] else "fused"
    return DEFAULT_KERNELS.attention
