"""Inference-only speed-ups of VAR sampling: what exact mode turns on, and the opt-in quantized modes.

Exact mode, `prepare_for_sampling(var, vqvae, device, dtype, kernels=...)` (same fp32 math, other summation
orders: greedy tokens stay identical on the goldens, images within their tolerances, with every `Kernels` choice):
- CPU: the transformer's Linear layers go through oneDNN's fp32 GEMM (`torch.ops.mkldnn._linear_pointwise`, an
  internal PyTorch op; checked at preparation, plain F.linear otherwise) instead of MKL's sgemm, with fc1's
  tanh-GELU fused into it and the weights packed once in oneDNN's layout (DenseLinear); on the AMD EPYC of
  BENCHMARKS.md that GEMM is about 1.35x faster, elsewhere it can be slower. The VQ-VAE decoder's upsampling
  convolutions run sub-pixel (fast_decoder.SubpixelUpsample: 2.25x fewer multiply-adds there), and its other
  convolutions either through NNPACK's Winograd kernel on the large maps (fast_decoder.WinogradConv2d: about 2.2x
  oneDNN's direct fp32 there) or with the three finest levels (85% of its multiply-adds) in channels_last, where
  oneDNN's fp32 convolutions are about 15% faster, with fast_decoder.TwoPassGroupNorm in place of PyTorch's
  channels_last GroupNorm, whose one-pass sums would move the golden image by most of its tolerance. Each of these
  is a `Kernels` choice: autotune.py keeps those that are faster on this machine. torch.compile is not used:
  measured on a d16 block it was no faster on a CPU, after 20 s of compiling per shape.
- CUDA: the Linear weights are stored in the sampling dtype (bf16), so autocast stops re-casting them at every
  call, and each scale's step is captured once as a CUDA graph and replayed (sampler.ScaleSteps). With a
  reduced-precision dtype the decoder also runs in channels_last.
- Under bf16/fp16 autocast on a CPU, VAR's attention runs unfused (models/var.unfused_attention) where that beats
  PyTorch's flash kernel (Kernels.attention, measured by autotune.py), and the VQ-VAE works one image at a time
  (fast_decoder.prepare_decoder's one_image_at_a_time), so that an image's pixels do not depend on its batch.

Opt-in, `quantize_var(var, mode, device)`:
- "int8" on CPU: dynamic int8 Linear layers (weights int8 per output channel, activations quantised per call and
  per token) through oneDNN's int8 GEMM (VNNI where the CPU has it), the maintained x86 path (torch.ao's dynamic
  quantisation and its quantized-tensor API are deprecated; torchao's int8 tensors are no faster than fp32 on a
  CPU without torch.compile). The head is left out (sampling reads its logits directly): exact mode's fp32 GEMM,
  or under bf16 autocast's bf16 product with the weights stored in bf16. fc1's tanh-GELU runs as gelu_tanh_
  (cheaper than PyTorch's).
  The layers take at most CHUNK_TOKENS tokens at a time, so that a batch's intermediates stay in the CPU's cache.
  On CUDA: bf16 weights.
- "bf16": bf16 weights for every Linear of the transformer, on any device.
Under reduced-precision autocast the AdaLN Linears are stored in its dtype too (_store_per_call_linears).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from popyou_cli.core.errors import PopyouError
from popyou_cli.core.presets import QUANTIZE_MODES
from popyou_cli.models.fast_decoder import prepare_decoder
from popyou_cli.models.generate import SamplingGraphs

# int8 layers run at most this many tokens at a time: one guided image's largest d16 scale (2 x 256). Larger
# batches spill the fp32 intermediates (fc1's output is 4x wider) out of the cache; chunks keep them there.
CHUNK_TOKENS = 512
_KERNEL_SPELLINGS = {"gemm": ("onednn", "plain"), "gelu": ("fused", "separate"),
                     "upsample": ("subpixel", "nearest"), "layout": ("channels_last", "nchw"),
                     "attention": ("unfused", "fused"), "fp32_conv": ("channels_last", "nchw", "winograd")}


@dataclass(frozen=True)
class Kernels:
    """How sampling computes on a CPU; every choice keeps exact mode within the goldens (test_fast_sampling
    checks each one). The defaults are the choices measured fastest on the AMD EPYC of BENCHMARKS.md; autotune.py
    measures them on the machine at hand. Spelled
    "gemm=onednn,gelu=fused,upsample=subpixel,layout=channels_last,attention=unfused,fp32_conv=channels_last"."""

    gemm: str = "onednn"  # fp32 Linear layers: "onednn" (oneDNN's GEMM) or "plain" (F.linear: MKL's sgemm)
    fused_gelu: bool = True  # fc1's tanh-GELU inside oneDNN's GEMM (with gemm "onednn" only)
    upsample: str = "subpixel"  # the decoder's upsampling: "subpixel" or "nearest" (upsample, then the 3x3 conv)
    channels_last: bool = True  # the decoder's memory format under bf16/fp16 autocast; never in fp32 (goldens)
    # VAR's attention under bf16/fp16 autocast on a CPU: "unfused" (var.unfused_attention: batched GEMMs and a
    # softmax) or "fused" (PyTorch's flash kernel); fp32 always runs the fused kernel (goldens)
    attention: str = "unfused"
    # the fp32 decoder's convolutions (exact mode, int8): oneDNN's on the finest levels in "channels_last" (with
    # TwoPassGroupNorm, within the goldens) or all "nchw", or "winograd" (NNPACK's on the large maps, NCHW; where
    # NNPACK is missing, as "nchw"); models/fast_decoder.py
    fp32_conv: str = "channels_last"

    def __post_init__(self):
        if (self.gemm not in _KERNEL_SPELLINGS["gemm"] or self.upsample not in _KERNEL_SPELLINGS["upsample"]
                or self.attention not in _KERNEL_SPELLINGS["attention"]
                or self.fp32_conv not in _KERNEL_SPELLINGS["fp32_conv"]):
            raise PopyouError(f"unknown kernels gemm={self.gemm}, upsample={self.upsample}, "
                              f"attention={self.attention}, fp32_conv={self.fp32_conv}")
        if self.gemm != "onednn":  # only oneDNN's GEMM can fuse the GELU: one spelling per behaviour
            object.__setattr__(self, "fused_gelu", False)

    @classmethod
    def parse(cls, text: str) -> "Kernels":
        """From "key=value,..." (keys gemm, gelu, upsample, layout, attention, fp32_conv); keys left out keep the
        default."""
        given = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = (x.strip().lower() for x in part.partition("="))
            if value not in _KERNEL_SPELLINGS.get(key, ()):
                choices = "; ".join(f"{k}={'|'.join(v)}" for k, v in _KERNEL_SPELLINGS.items())
                raise PopyouError(f"unknown kernel choice '{part}' (use {choices})")
            given[key] = value
        values = dict(part.split("=") for part in cls().spelled().split(","))  # the defaults, then the given
        values.update(given)
        return cls(gemm=values["gemm"], fused_gelu=values["gelu"] == "fused", upsample=values["upsample"],
                   channels_last=values["layout"] == "channels_last", attention=values["attention"],
                   fp32_conv=values["fp32_conv"])

    def spelled(self) -> str:
        """The parse() spelling; gelu says "separate" wherever it is not fused (plain GEMM included)."""
        gelu = "fused" if self.fused_gelu and self.gemm == "onednn" else "separate"
        layout = "channels_last" if self.channels_last else "nchw"
        return (f"gemm={self.gemm},gelu={gelu},upsample={self.upsample},layout={layout},attention={self.attention},"
                f"fp32_conv={self.fp32_conv}")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def exact_choices(cls) -> list["Kernels"]:
        """Every distinct combination exact mode (fp32) can run: the GEMM with or without the fused GELU, the
        upsampling and the fp32 decoder's convolutions (`layout` and `attention` apply to reduced precision only)."""
        gemms = [("onednn", True), ("onednn", False), ("plain", False)]
        return [cls(gemm=g, fused_gelu=f, upsample=u, fp32_conv=c)
                for g, f in gemms for u in ("subpixel", "nearest") for c in _KERNEL_SPELLINGS["fp32_conv"]]


DEFAULT_KERNELS = Kernels()


def onednn_linear_available() -> bool:
    try:
        x, w = torch.ones(1, 8), torch.ones(4, 8)
        return torch.allclose(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), x @ w.T)
    except (AttributeError, RuntimeError):
        return False


def onednn_int8_available() -> bool:
    try:
        torch.ops.onednn.qlinear_prepack(torch.ones(4, 8, dtype=torch.int8), None)
        return True
    except (AttributeError, RuntimeError):
        return False


class DenseLinear(nn.Module):
    """An fp32 Linear through oneDNN (optionally with tanh-GELU fused); falls back to F.linear off the CPU, under
    autocast or when gradients are wanted (the oneDNN op has no backward). On a CPU the weight is kept only in
    oneDNN's blocked layout, packed once here, so that no call repacks it (VAR-d16 exact mode at B=4: 5.25 -> 5.13
    s/image) and no plain copy doubles the memory; `weight` and the state dict give it back plain."""

    takes_bias = True  # VAR's attention passes its q|0|v bias in (models/var.py)

    def __init__(self, linear: nn.Module, gelu: bool = False):
        super().__init__()
        self.bias, self.gelu = linear.bias, gelu
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight
        packed = _packed(weight.detach()) if weight.device.type == "cpu" and weight.dtype == torch.float32 else None
        if packed is not None:
            self.packed = packed  # a plain attribute: the state dict gets the weight back plain (below)
        else:
            self.packed, self.weight = None, weight

    def __getattr__(self, name: str):
        if name == "weight" and self.__dict__.get("packed") is not None:
            return self.__dict__["packed"].to_dense()
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b = self.bias if bias is None else bias
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.packed is not None
                and not torch.is_autocast_enabled("cpu") and not (torch.is_grad_enabled() and x.requires_grad)):
            post = ("gelu", [], "tanh") if self.gelu else ("none", [], "")
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, b, *post)
        y = F.linear(x, self.weight, b)
        return F.gelu(y, approximate="tanh") if self.gelu else y

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed is not None:
            destination[prefix + "weight"] = self.weight


def _packed(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight in oneDNN's blocked layout for its fp32 GEMM (an mkldnn tensor), or None where PyTorch lacks the
    op. Packed for any number of rows (a batch-size hint only tunes it; measured no faster here)."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)
    except (AttributeError, RuntimeError):
        return None


class CastLinear(nn.Module):
    """A Linear whose weights are stored in a lower precision (bf16/fp16). Outside autocast the output is cast
    back to the input's dtype, so the residual stream keeps its precision."""

    takes_bias = True  # VAR's attention passes its q|0|v bias in (models/var.py)

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, gelu: bool = False):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        self.gelu, self.in_features, self.out_features = gelu, linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b = self.bias if bias is None else bias.to(self.weight.dtype)
        y = F.linear(x.to(self.weight.dtype), self.weight, b)
        if self.gelu:
            y = F.gelu(y, approximate="tanh")
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)


class Int8Linear(nn.Module):
    """Dynamic int8 Linear on the CPU: W symmetric int8 per output channel; x quantised at every call per row
    (token) to 8 bits over its own absolute maximum, stored as uint8 with zero point 128 (oneDNN's fast int8
    GEMM takes unsigned activations; signed ones fall to a slow reference kernel), int32 accumulation, fp32
    output. Per-row scales keep a large-norm token from flattening the others (on tiny10, greedy, the worst scale
    agreed 89% with per-tensor scales and 96% with per-row ones)."""

    takes_bias = True  # VAR's attention passes its q|0|v bias in (models/var.py)

    def __init__(self, linear: nn.Linear, gelu: bool = False):
        super().__init__()
        w = linear.weight.detach().float().cpu()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.register_buffer("w_packed", torch.ops.onednn.qlinear_prepack(q, None))
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_zero", torch.zeros(len(scale), dtype=torch.int32))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().cpu())
        self.gelu, self.in_features, self.out_features = gelu, linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type != "cpu":
            raise PopyouError("int8 layers run on the CPU only (on a GPU, quantize to bf16)")
        b = self.bias if bias is None else bias.float()
        x2 = x.reshape(-1, self.in_features).float()
        out = x2.new_empty(len(x2), self.out_features)
        for start in range(0, len(x2), CHUNK_TOKENS):  # each chunk's result is written straight into `out`
            self._rows(x2[start:start + CHUNK_TOKENS], b, out[start:start + CHUNK_TOKENS])
        return out.view(*x.shape[:-1], self.out_features)

    def _rows(self, x2: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> None:
        xq, row_scale = quantize_rows(x2)
        y = torch.ops.onednn.qlinear_pointwise(xq, 1.0, 128, self.w_packed, self.w_scale, self.w_zero, None,
                                               1.0, 0, torch.float32, "none", [], "")
        if b is not None:
            torch.addcmul(b, y, row_scale, out=out)
        else:
            torch.mul(y, row_scale, out=out)
        if self.gelu:
            gelu_tanh_(out)


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 rows (N, K) -> (uint8 codes round(x / scale) + 128 in [1, 255], per-row scale (N, 1) = max |x| / 127).
    Without a float -> uint8 conversion (PyTorch's costs 3x the rest): adding 2^23 + 128 rounds x / scale half to
    even, as round() does, into the float's low mantissa bits (floats in [2^23, 2^24) are integers), read back as
    its int32 bits less 2^23's (0x4B000000)."""
    row_scale = x2.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127)
    xq = x2.div(row_scale).add_(2.0 ** 23 + 128).view(torch.int32).sub_(0x4B000000).to(torch.uint8)
    return xq, row_scale


_TWO_SQRT_2_OVER_PI = 2 * math.sqrt(2 / math.pi)


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """tanh-GELU in place, as x * sigmoid(2u) with u = sqrt(2/pi) (x + 0.044715 x^3): the same function
    (0.5 (1 + tanh u) = sigmoid(2u)) up to fp32 rounding, but PyTorch's CPU GELU kernel spends its time in tanh
    (fc1's 512 x 4096 fp32 chunk: 2.1 ms there, 1.3 ms here). One temporary the size of x."""
    u = x * x
    u.mul_(_TWO_SQRT_2_OVER_PI * 0.044715).add_(_TWO_SQRT_2_OVER_PI).mul_(x).sigmoid_()
    return x.mul_(u)


class FusedFFN(nn.Module):
    """FFN with GELU inside fc1's kernel; same parameter names (fc1, fc2). With int8 layers it runs CHUNK_TOKENS
    tokens at a time, so that fc1's 4x wider output stays in the CPU's cache between the kernels that quantise,
    rescale and activate it (measured on one d16 block at B=4's last scale: 189 -> 151 ms; no gain for the bf16
    or fp32 GEMMs, whose GELU is fused or cheap, so they run whole)."""

    def __init__(self, fc1: nn.Module, fc2: nn.Module):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        if len(tokens) <= CHUNK_TOKENS or not isinstance(self.fc1, Int8Linear):
            return self.fc2(self.fc1(x))
        out = torch.cat([self.fc2(self.fc1(tokens[i:i + CHUNK_TOKENS])) for i in range(0, len(tokens), CHUNK_TOKENS)])
        return out.view(*x.shape[:-1], out.shape[-1])


def _replace_linears(var, make, fuse_gelu: bool = True) -> None:
    """make(linear, gelu) -> module, for the attention, FFN and head Linears (ada_lin runs once per call). With
    fuse_gelu, fc1's module applies the GELU (FusedFFN); without, the FFN keeps applying it after fc1."""
    for block in var.blocks:
        attn, ffn = block.attn, block.ffn
        if isinstance(attn.mat_qkv, nn.Linear):
            attn.mat_qkv = make(attn.mat_qkv, False)
        if isinstance(attn.proj, nn.Linear):
            attn.proj = make(attn.proj, False)
        if not isinstance(ffn, FusedFFN) and not fuse_gelu:
            ffn.fc1, ffn.fc2 = (make(lin, False) if isinstance(lin, nn.Linear) else lin for lin in (ffn.fc1, ffn.fc2))
        elif not isinstance(ffn, FusedFFN):
            block.ffn = FusedFFN(make(ffn.fc1, True), make(ffn.fc2, False))
        else:
            for name in ("fc1", "fc2"):
                if isinstance(getattr(ffn, name), nn.Linear):
                    setattr(ffn, name, make(getattr(ffn, name), name == "fc1"))
    if isinstance(var.head, nn.Linear):
        var.head = make(var.head, False)


def _store_per_call_linears(var, dtype: torch.dtype) -> None:
    """Under reduced-precision autocast, the AdaLN Linears (6C x C per block) were cast from fp32 at every call
    (VAR-d16, with int8 mode's head: 0.6 GB of weights per sampling call, about 2% of a --fast image at B=1); stored
    in the autocast dtype, they compute the same bf16 products without the cast."""
    for name, module in var.named_modules():
        if name.endswith("ada_lin") and isinstance(module[-1], nn.Linear):  # (SiLU, Linear): blocks, head_nm, shared
            module[-1] = CastLinear(module[-1], dtype)


def quantize_var(var, mode: str | None, device: str | torch.device | None = None):
    """The opt-in fast modes (module docstring), in place; returns var. None/"none" changes nothing."""
    if mode in (None, "none", "fp32"):
        return var
    if mode not in QUANTIZE_MODES:
        raise PopyouError(f"unknown --quantize '{mode}' (use {', '.join(QUANTIZE_MODES)})")
    dev = torch.device(device) if device is not None else var.pos_1LC.device
    if mode == "bf16" or dev.type != "cpu":
        _replace_linears(var, lambda lin, gelu: CastLinear(lin, torch.bfloat16, gelu))
        return var
    if not onednn_int8_available():
        raise PopyouError("--quantize int8 needs PyTorch's oneDNN int8 kernels, which this build lacks")
    head = var.head  # left a plain Linear: prepare_for_sampling gives it exact mode's GEMM or the autocast dtype
    _replace_linears(var, lambda lin, gelu: Int8Linear(lin, gelu) if lin is not head else lin)
    return var


def prepare_for_sampling(var, vqvae, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                         *, quantize: str | None = None, cuda_graphs: bool = True, kernels: Kernels = DEFAULT_KERNELS):
    """Exact-mode speed-ups in place (module docstring; `kernels` picks among them), then `quantize`. dtype is the
    autocast dtype sampling runs under. Inference only: the replaced layers do not train. Returns the
    SamplingGraphs to pass to generate on CUDA (None elsewhere, or without cuda_graphs)."""
    dev = torch.device(device) if device is not None else var.pos_1LC.device
    quantize_var(var, quantize, dev)
    for block in var.blocks:  # read only under reduced-precision autocast (models/var.py)
        block.attn.unfused_attention = dev.type == "cpu" and kernels.attention == "unfused"
    if dev.type == "cpu":
        if dtype == torch.float32 and kernels.gemm == "onednn" and onednn_linear_available():
            _replace_linears(var, lambda lin, gelu: DenseLinear(lin, gelu), fuse_gelu=kernels.fused_gelu)
        elif dtype != torch.float32:
            _replace_linears(var, lambda lin, gelu: CastLinear(lin, dtype, gelu))
            _store_per_call_linears(var, dtype)
    elif dtype in (torch.bfloat16, torch.float16):
        _replace_linears(var, lambda lin, gelu: CastLinear(lin, dtype, gelu))
        _store_per_call_linears(var, dtype)
    if vqvae is not None:
        prepare_decoder(vqvae, channels_last=dtype != torch.float32 and kernels.channels_last,
                        subpixel=kernels.upsample == "subpixel",
                        fp32_conv=kernels.fp32_conv if dtype == torch.float32 and dev.type == "cpu" else "nchw",
                        one_image_at_a_time=dtype != torch.float32 and dev.type == "cpu")
    return SamplingGraphs() if dev.type == "cuda" and cuda_graphs else None
