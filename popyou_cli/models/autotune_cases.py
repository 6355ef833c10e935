"""The calls autotune.py times, built on the model's real shapes: one transformer block per way of running its
Linear layers, the decoder's heaviest convolution (and the GroupNorm before it) and its largest upsampling. Each
builder returns argument-free callables; building copies only the part it needs (one block, one conv), so the models
stay as they were."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from popyou_cli.core import devices
from popyou_cli.models.fast import Kernels, prepare_for_sampling
from popyou_cli.models.fast_decoder import (SubpixelUpsample, TwoPassGroupNorm, WinogradConv2d, traced_convs,
                                           winograd_available)
from popyou_cli.models.var import KVCache
from popyou_cli.models.vqvae import Upsample

CPU = torch.device("cpu")
GUIDED_ROWS = 2  # one image with classifier-free guidance: its conditional and unconditional rows


class _OneBlock(nn.Module):
    """One transformer block, shaped as prepare_for_sampling expects a VAR (blocks, no head)."""
    head = None

    def __init__(self, block: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList([copy.deepcopy(block)])


def block_case(var, dtype: torch.dtype, quantize: str | None, kernels: Kernels) -> Callable[[], torch.Tensor]:
    """A copy of the first block, prepared as sampling in this mode prepares it, run on the largest scale's tokens
    of one guided image while the KV cache holds every earlier scale."""
    one = _OneBlock(var.blocks[0]).to(CPU).eval()
    prepare_for_sampling(one, None, CPU, dtype, quantize=quantize, kernels=kernels)
    block, cfg = one.blocks[0], var.config
    last = cfg.patch_nums[-1] ** 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(GUIDED_ROWS, last, cfg.embed_dim, generator=gen)
    ada = torch.randn(GUIDED_ROWS, 1, 6, cfg.embed_dim, generator=gen).mul_(0.1)
    cache = block.attn.kv_cache = KVCache(cfg.L)
    primed = []

    def call() -> torch.Tensor:
        cache.reset()
        cache.len = cfg.L - last  # the earlier scales' keys and values are in the cache
        with torch.no_grad(), devices.autocast(CPU, dtype):
            out = block(x, ada)
        if not primed:  # the first call allocated the cache: zeros where the earlier scales would be
            primed.append(True)
            for t in cache._full:
                t.zero_()
        return out

    return call


def conv_cases(vqvae, bf16: bool) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, float]]:
    """({"conv fp32", "conv fp32 channels_last", "norm fp32 nchw", "norm fp32 channels_last", where NNPACK runs
    and the conv fits it "conv fp32 winograd", and with bf16 "conv bf16 nchw" and "conv bf16 channels_last": call},
    {"all": the decoder's multiply-adds over the heaviest convolution's, "winograd": those of the convs Winograd
    takes (not the upsamplings', which run sub-pixel) over the heaviest's}): that convolution on one image at its
    real size, and the GroupNorm of its input in fp32 as each layout runs it (the stock kernel on NCHW,
    TwoPassGroupNorm on channels_last), since exact mode's channels_last pays for its precise norm."""
    traced = traced_convs(vqvae)
    conv, shape, macs = max(traced, key=lambda t: t[2])
    conv = copy.deepcopy(conv).to(CPU).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    norm = nn.GroupNorm(vqvae.decoder.norm_out.num_groups, shape[1], eps=vqvae.decoder.norm_out.eps)

    def run(module, inp, dtype):
        def call():
            with torch.no_grad(), devices.autocast(CPU, dtype):
                return module(inp)
        return call

    cases = {"conv fp32": run(conv, x, torch.float32), "conv fp32 channels_last": run(conv_cl, x_cl, torch.float32),
             "norm fp32 nchw": run(norm, x, torch.float32),
             "norm fp32 channels_last": run(TwoPassGroupNorm.of(norm), x_cl, torch.float32)}
    if winograd_available() and WinogradConv2d.fits(conv, shape):
        cases["conv fp32 winograd"] = run(WinogradConv2d(conv), x, torch.float32)
    if bf16:
        cases.update({"conv bf16 nchw": run(conv, x, torch.bfloat16),
                      "conv bf16 channels_last": run(conv_cl, x_cl, torch.bfloat16)})
    upsampling = {id(m.conv) for m in vqvae.decoder.modules() if isinstance(m, Upsample)}
    winograd = sum(m for c, s, m in traced if id(c) not in upsampling and WinogradConv2d.fits(c, s))
    return cases, {"all": sum(t[2] for t in traced) / macs, "winograd": winograd / macs}


def upsample_cases(vqvae) -> dict[str, Callable[[], torch.Tensor]]:
    """{"nearest": upsample then 3x3 conv, "subpixel": SubpixelUpsample} for the decoder's largest upsampling, in
    fp32 on one image; {} for a decoder without one."""
    traced = {id(conv): (shape, macs) for conv, shape, macs in traced_convs(vqvae)}
    ups = [getattr(level, level.resample) for level in vqvae.decoder.up if level.resample]
    ups = [u for u in ups if isinstance(u, Upsample) and id(u.conv) in traced]
    if not ups:
        return {}
    largest = max(ups, key=lambda u: traced[id(u.conv)][1])
    n, c, h, w = traced[id(largest.conv)][0]  # the conv's input: the upsampled map
    up = copy.deepcopy(largest).to(CPU).eval()
    x = torch.randn(n, c, h // 2, w // 2, generator=torch.Generator().manual_seed(0))
    sub = SubpixelUpsample(up)

    def run(module):
        def call():
            with torch.no_grad():
                return module(x)
        return call

    return {"nearest": run(up), "subpixel": run(sub)}
