"""VAR's next-scale sampler (VAR.generate): KV-cached, with the reference's CFG ramp and sampling order.

What it adds to the reference loop, all opt-in or output-preserving:
- `cfg_scales=K`: classifier-free guidance only on the first K scales. From scale K on, only the conditional
  half of the batch runs: the caches keep their first B rows (the conditional ones; a view, nothing is copied).
  K >= the number of scales is the reference loop bit for bit. With cfg == 0 the guided logits are the
  conditional ones exactly, so the unconditional half is never run (K = 0).
- a static per-scale step (blocks + head on fixed-size buffers, the KV cache written at fixed offsets), which
  CUDA graphs can capture once per (scale, rows) and replay (`ScaleSteps`, enabled by fast.prepare_for_sampling
  on CUDA). On the CPU the same step runs eagerly.
- on a CPU, top-p after top-k sorts only the k candidates (`_mask_from_candidates_`, the reference's masking bit
  for bit), and with one generator per image the images' random draws run on parallel threads
  (`_draw_per_image`, the same draws): the same tokens either way.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from typing import Callable

import torch

from popyou_cli.models.var import KVCache
from popyou_cli.models.vqvae import VQVAE


def guided_scales(cfg: float, cfg_scales: int | None, num_scales: int) -> int:
    """How many scales (from the first) run with guidance."""
    if cfg == 0:
        return 0  # (1 + 0) * cond - 0 * uncond == cond: the unconditional half would be thrown away
    return num_scales if cfg_scales is None else max(0, min(int(cfg_scales), num_scales))


class CudaGraph:
    """One captured step. `fn` reads and writes only static buffers, so replaying it redoes the step on new data."""

    def __init__(self, fn: Callable[[], torch.Tensor]):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


class ScaleSteps:
    """Static KV cache + static step buffers for one batch layout (rows of the first scale, dtype), kept across
    calls so that captured graphs stay valid. graph_cls: CudaGraph on CUDA; tests pass a CPU stand-in."""

    def __init__(self, var, graph_cls=CudaGraph):
        self.var, self.graph_cls, self.graphs, self.failed = var, graph_cls, {}, False
        self.caches = [KVCache(var.config.L) for _ in var.blocks]
        self.x_in: dict[tuple[int, int], torch.Tensor] = {}
        self.mods: list[torch.Tensor] | None = None
        self.cond: torch.Tensor | None = None

    def load(self, mods: list[torch.Tensor], cond: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Copies this call's conditioning into the static buffers; returns the buffers."""
        if self.mods is None:
            self.mods, self.cond = [m.clone() for m in mods], cond.clone()
        else:
            for dst, src in zip(self.mods, mods):
                dst.copy_(src)
            self.cond.copy_(cond)
        return self.mods, self.cond

    def run(self, si: int, offset: int, x: torch.Tensor, step: Callable) -> torch.Tensor:
        key = (si, x.shape[0])
        if key in self.graphs:
            self.x_in[key].copy_(x)
            return self.graphs[key].replay()
        xs = self.x_in.setdefault(key, x.clone())
        xs.copy_(x)
        fn = lambda: step(si, offset, xs)  # noqa: E731 - reads only static buffers
        if self.failed:
            return fn()
        if xs.device.type == "cuda":  # warm-up on a side stream before capture, as CUDA graphs require
            side = torch.cuda.Stream(xs.device)
            side.wait_stream(torch.cuda.current_stream(xs.device))
            with torch.cuda.stream(side):
                out = fn()
            torch.cuda.current_stream(xs.device).wait_stream(side)
        else:
            out = fn()
        try:
            with _no_autocast_cache(xs.device.type):
                self.graphs[key] = self.graph_cls(fn)
        except Exception as e:  # noqa: BLE001 - a capture failure must not lose the image: run eagerly from now on
            self.failed = True
            warnings.warn(f"CUDA graph capture failed, sampling eagerly: {e}", RuntimeWarning, stacklevel=2)
        return out


def _no_autocast_cache(device_type: str):
    """Autocast's weight-cast cache must be off while capturing (casts made during capture would be reused)."""
    import contextlib

    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


class SamplingGraphs:
    """One model's captured sampling steps, kept across calls: a ScaleSteps per (rows, device, dtype). Its owner
    (the Pipeline, from fast.prepare_for_sampling on CUDA) passes it to every generate call of that model, so that
    the graphs captured by the first call are replayed by the next. graph_cls: CudaGraph; tests pass a stand-in."""

    def __init__(self, graph_cls=CudaGraph):
        self.graph_cls = graph_cls
        self.steps: dict[tuple, ScaleSteps] = {}

    def steps_for(self, var, rows: int, dev: torch.device) -> ScaleSteps:
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else torch.float32
        key = (rows, str(dev), dtype)
        if key not in self.steps:
            self.steps[key] = ScaleSteps(var, self.graph_cls)
        return self.steps[key]


@torch.no_grad()
def generate(var, vae: VQVAE, batch_size: int, labels: torch.Tensor | int | None, *, cfg: float = 1.5,
             top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
             generator: torch.Generator | list[torch.Generator] | None = None,
             cond_delta: torch.Tensor | None = None, alpha: float = 1.0, beta: float = 1.0,
             on_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
             return_fhat: bool = False, cfg_scales: int | None = None,
             graphs: SamplingGraphs | None = None) -> torch.Tensor:
    """Next-scale sampling with the reference CFG ramp (t = cfg * si / (S-1)). Returns images in [0, 1].
    labels: tensor (B,), an int for all, None for uniformly random classes; negative means the null class.
    generator: one generator for the batch (the reference's draws, bit for bit), or a list of B generators,
    one per image, so that an image depends on its own seed and not on the rest of its batch.
    cfg_scales: guidance only on the first K scales, then only the conditional half runs (None: all scales,
    the reference). graphs: the model's captured steps (SamplingGraphs; None: eager). on_step(si,
    guided_logits_before_masking, tokens, f_hat) is for tests and debugging."""
    B, dev = batch_size, var.pos_1LC.device
    pns, S = var.config.patch_nums, len(var.config.patch_nums)
    K = guided_scales(cfg, cfg_scales, S)
    labels = _labels(var, labels, B, generator, dev)
    rows = 2 * B if K > 0 else B
    cond, lvl_pos, nxt = _first_input(var, labels, cond_delta, alpha, beta, guided=K > 0)
    mods = var.block_modulations(cond)  # computed once: the condition never changes during sampling
    static = graphs.steps_for(var, rows, dev) if graphs is not None else None
    if static is not None:
        mods, cond = static.load(mods, cond)
    caches = static.caches if static is not None else None
    f_hat = torch.zeros(B, var.config.z_channels, pns[-1], pns[-1], device=dev)
    for i, b in enumerate(var.blocks):
        b.attn.kv_cache = caches[i].reset() if caches is not None else _new_cache(var)
    step_mods, step_cond = mods, cond

    try:
        cur = 0
        for si, pn in enumerate(pns):
            if si == K and rows == 2 * B:  # guidance ends: keep the conditional half, caches included
                rows, step_cond = B, step_cond[:B]
                step_mods = [m[:B] for m in step_mods]
                for b in var.blocks:
                    b.attn.kv_cache.keep_rows(B)
            ratio = si / (S - 1)
            if static is not None:  # the step is bound to this layout's static buffers (what a graph captures)
                logits = static.run(si, cur, nxt, partial(_step, var, mods=step_mods, cond=step_cond))
            else:
                logits = _step(var, si, cur, nxt, mods=step_mods, cond=step_cond)
            cur += pn * pn
            if si < K:
                t = cfg * ratio
                logits = (1 + t) * logits[:B] - t * logits[B:]
            elif static is not None:
                logits = logits.clone()  # the static output buffer is overwritten by the next call
            raw = logits.clone() if on_step is not None else None
            idx = sample_top_k_top_p_(logits, top_k, top_p, generator)
            h = _code_embeddings(vae, logits, idx, ratio, more_smooth, generator).transpose(1, 2).reshape(B, -1, pn, pn)
            f_hat, nxt_map = vae.quantize.next_ar_input(si, f_hat, h)
            if on_step is not None:
                on_step(si, raw, idx, f_hat.clone())
            if si != S - 1:
                nxt = var.word_embed(nxt_map.view(B, nxt_map.shape[1], -1).transpose(1, 2))
                nxt = nxt + lvl_pos[:, cur:cur + pns[si + 1] ** 2]
                if si + 1 < K:
                    nxt = nxt.repeat(2, 1, 1)
    finally:
        for b in var.blocks:
            b.attn.kv_cache = None
    if return_fhat:
        return f_hat
    return vae.decode_fhat(f_hat).add_(1).mul_(0.5)


def _labels(var, labels: torch.Tensor | int | None, B: int, generator, dev: torch.device) -> torch.Tensor:
    """The class of every image (B,): as given, one int for all, or drawn uniformly (None) from the first
    generator; negative means the null class."""
    if labels is None:
        g = generator[0] if isinstance(generator, (list, tuple)) else generator
        uniform = torch.ones(var.num_classes, device=g.device if g is not None else dev)
        labels = torch.multinomial(uniform, B, replacement=True, generator=g).to(dev)
    elif isinstance(labels, int):
        labels = torch.full((B,), labels, device=dev)
    return torch.where(labels < 0, var.num_classes, labels.to(dev))


def _first_input(var, labels: torch.Tensor, cond_delta, alpha: float, beta: float, *, guided: bool):
    """(condition rows, level + position embeddings, the first scale's input), in fp32. Guided: the unconditional
    rows (null class, no delta) follow the conditional ones."""
    rows = 2 * len(labels) if guided else len(labels)
    with torch.autocast(labels.device.type, enabled=False):
        cond = var.condition(labels, cond_delta, alpha, beta)
        if guided:
            cond = torch.cat((cond, var.condition(torch.full_like(labels, var.num_classes), None, alpha)))
        lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
        nxt = (cond.unsqueeze(1).expand(rows, var.first_l, -1) + var.pos_start.expand(rows, var.first_l, -1)
               + lvl_pos[:, :var.first_l])
    return cond, lvl_pos, nxt


def _code_embeddings(vae: VQVAE, logits: torch.Tensor, idx: torch.Tensor, ratio: float, more_smooth: bool,
                     generator) -> torch.Tensor:
    """The drawn codes' embeddings (B, l, C); with more_smooth, a Gumbel-softmax blend of the codebook instead,
    sharper as the scales grow (the reference's tau schedule)."""
    if more_smooth:
        tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
        return gumbel_softmax(logits.mul(1 + ratio), tau, generator) @ vae.quantize.embedding.weight.unsqueeze(0)
    return vae.quantize.embedding(idx)


def _step(var, si: int, offset: int, x: torch.Tensor, *, mods: list[torch.Tensor], cond: torch.Tensor) -> torch.Tensor:
    """One scale through every block (appending to the caches at `offset`) and the head: logits (rows, pn*pn, V)."""
    for b, ada in zip(var.blocks, mods):
        b.attn.kv_cache.len = offset  # explicit, so that a replayed capture and an eager step agree
        x = b(x, ada)
    return var.logits(x, cond)


def _new_cache(var):

    return KVCache(var.config.L)


def sample_top_k_top_p_(logits: torch.Tensor, top_k: int, top_p: float, generator) -> torch.Tensor:
    """Masks logits (B, l, V) IN PLACE as the reference does, then draws one token per position."""
    B, l, V = logits.shape
    # on a GPU the whole-row sort is cheap, and the candidates' checks would wait for the GPU at every scale
    cpu = logits.device.type == "cpu"
    if not (cpu and 0 < top_k < V and top_p > 0 and _mask_from_candidates_(logits, top_k, top_p)):
        _mask_sorting_the_vocabulary_(logits, top_k, top_p)
    probs = logits.softmax(dim=-1).view(-1, V)
    if isinstance(generator, (list, tuple)):  # one generator per image: an image's draws ignore its batch
        if B > 1 and cpu and torch.get_num_threads() > 1:
            return _draw_per_image(probs.view(B, l, V), generator)
        return torch.cat([torch.multinomial(p, 1, replacement=True, generator=g)
                          for p, g in zip(probs.view(B, l, V), generator)]).view(B, l)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(B, l)


def _mask_sorting_the_vocabulary_(logits: torch.Tensor, top_k: int, top_p: float) -> None:
    """The reference's masking: top-k, then top-p over the whole vocabulary sorted."""
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)  # ties with the k-th value survive
    if top_p > 0:
        srt, order = logits.sort(dim=-1, descending=False)
        remove = srt.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False  # the most likely token always stays
        logits.masked_fill_(remove.scatter(order.ndim - 1, order, remove), -torch.inf)


def _mask_from_candidates_(logits: torch.Tensor, top_k: int, top_p: float) -> bool:
    """The same masking sorting only the k candidates (d16's last scale: 20 ms instead of 55 for 4 images): the
    row the reference sorts is rebuilt (-inf first, then the candidates), so its softmax and cumulative sum are the
    reference's bit for bit, and the tokens it removes are a prefix of it, that is every value below the first one
    kept. False (nothing done) where the result would depend on how the sort orders equal values: ties at the
    k-th value (more than k candidates) or a cut between two equal values."""
    V = logits.shape[-1]
    ranked = logits.topk(top_k + 1, dim=-1, largest=True, sorted=False)[0].sort(dim=-1)[0]  # (k+1)-th, k-th, ...
    if bool((ranked[..., 0] == ranked[..., 1]).any()):
        return False
    srt = ranked.new_full(logits.shape, -torch.inf)
    srt[..., V - top_k:] = ranked[..., 1:]
    cumulative = srt.softmax(dim=-1).cumsum_(dim=-1)  # never decreases: a prefix is <= 1 - top_p
    gone = torch.searchsorted(cumulative, cumulative.new_full((*logits.shape[:-1], 1), 1 - top_p), right=True)
    gone.clamp_max_(V - 1)  # the most likely token always stays
    first_kept, last_gone = srt.gather(-1, gone), srt.gather(-1, (gone - 1).clamp_min_(0))
    if bool(((gone > 0) & (last_gone == first_kept) & last_gone.isfinite()).any()):
        return False
    logits.masked_fill_(logits < torch.maximum(first_kept, ranked[..., 1:2]), -torch.inf)
    return True


def _draw_per_image(probs: torch.Tensor, generators) -> torch.Tensor:
    """torch.multinomial(p, 1) for each image (B, l, V) with its own generator, the images' draws on parallel
    threads. multinomial draws one Exp(1) per vocabulary entry, q, and returns argmax(p / q); PyTorch draws a
    generator's stream on one core, in order, so images drawn side by side are ~2x faster on 2 cores (d16's last
    scale, 4 images: 40 ms instead of 79). Same draws, same tokens (a test holds it to multinomial)."""
    total = probs.sum(-1)  # softmax output: non-negative, so a NaN, inf or empty row shows in its sum
    if not (total.isfinite().all() and total.gt(0).all()):
        torch.multinomial(probs.view(-1, probs.shape[-1]), 1, replacement=True)  # raises multinomial's error
    q = torch.empty_like(probs)
    threads = _draw_threads(torch.get_num_threads(), os.getpid())
    list(threads.map(lambda i: q[i].exponential_(generator=generators[i]), range(len(q))))
    return torch.div(probs, q, out=q).argmax(dim=-1)


@lru_cache(maxsize=None)
def _draw_threads(n: int, pid: int) -> ThreadPoolExecutor:
    """A pool per process: a forked child inherits the parent's pool without its threads (work sent there waits)."""
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="popyou-draws")


def gumbel_softmax(logits: torch.Tensor, tau: float, generator) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        noise = torch.stack([torch.empty_like(row).exponential_(generator=g) for row, g in zip(logits, generator)])
    else:
        noise = torch.empty_like(logits).exponential_(generator=generator)
    return ((logits - noise.log()) / tau).softmax(dim=-1)
