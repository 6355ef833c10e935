"""`popyou bench sample`: seconds per image of VAR sampling in every mode, against the reference's inference
pattern, in one run; plus the demo's beta video and each fast mode's distance from exact mode. It first prints the
CPU and its instruction sets, exact mode's kernels and the mode `--fast` picks for this model (autotune.py: measured
here the first time, cached after), and times `--fast` as one more mode.

Random weights (no download), 256 px, cfg 1.5, top-k 900, top-p 0.96, decode included. Modes are timed
round-robin, so that the load of a shared machine hits all of them alike; medians are reported. The reference
pattern and every mode draw with one generator per image (as the pipeline does), so that greedy and sampled
tokens can be compared across modes.
"""
from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from popyou_cli.models import autotune

from popyou_cli.core import devices
from popyou_cli.models.fast import DEFAULT_KERNELS, prepare_for_sampling
from popyou_cli.models.generate import sample_top_k_top_p_  # the reference loop below samples so
from popyou_cli.models.generate import generate


# ------------------------------------------------------------------------------------------ the reference pattern
class CatKVCache:
    """The reference's cache: the new scale's keys and values concatenated onto the old ones."""

    def __init__(self):
        self.k = self.v = None
        self.len = 0

    def append(self, k, v):
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


@torch.no_grad()
def reference_pattern(var, vae, B: int, labels: torch.Tensor, *, cfg: float, top_k: int, top_p: float,
                      generator, cond_delta=None, return_fhat: bool = False, on_step=None) -> torch.Tensor:
    """VAR's autoregressive_infer_cfg as the reference runs it, on popyou's (unprepared) modules: every block
    recomputes its AdaLN modulation at every scale, the KV cache grows by torch.cat, Linear layers are plain
    nn.Linear (MKL), the decoder upsamples then convolves in NCHW."""
    dev, pns = var.pos_1LC.device, var.config.patch_nums
    S = len(pns)
    labels = labels.to(dev)
    cond = torch.cat((var.condition(labels, cond_delta), var.condition(torch.full_like(labels, var.num_classes))))
    lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
    nxt = (cond.unsqueeze(1).expand(2 * B, var.first_l, -1) + var.pos_start.expand(2 * B, var.first_l, -1)
           + lvl_pos[:, :var.first_l])
    f_hat = torch.zeros(B, var.config.z_channels, pns[-1], pns[-1], device=dev)
    for b in var.blocks:
        b.attn.kv_cache = CatKVCache()
    try:
        cur = 0
        for si, pn in enumerate(pns):
            cur += pn * pn
            x = nxt
            for b in var.blocks:
                x = b(x, b.modulation(cond).view(-1, 1, 6, var.config.embed_dim))
            logits = var.logits(x, cond)
            t = cfg * si / (S - 1)
            logits = (1 + t) * logits[:B] - t * logits[B:]
            idx = sample_top_k_top_p_(logits, top_k, top_p, generator)
            if on_step is not None:
                on_step(si, idx)
            h = vae.quantize.embedding(idx).transpose(1, 2).reshape(B, -1, pn, pn)
            f_hat, nxt_map = vae.quantize.next_ar_input(si, f_hat, h)
            if si != S - 1:
                nxt = var.word_embed(nxt_map.view(B, nxt_map.shape[1], -1).transpose(1, 2))
                nxt = (nxt + lvl_pos[:, cur:cur + pns[si + 1] ** 2]).repeat(2, 1, 1)
    finally:
        for b in var.blocks:
            b.attn.kv_cache = None
    return f_hat if return_fhat else vae.decode_fhat(f_hat).add_(1).mul_(0.5)


# ------------------------------------------------------------------------------------------ modes
@dataclass
class Mode:
    name: str
    var: object
    vae: object
    dtype: torch.dtype = torch.float32
    cfg_scales: int | None = None
    reference: bool = False
    note: str = ""
    times: dict = field(default_factory=dict)  # batch -> [seconds]

    def sample(self, B, labels, seeds, *, cfg, top_k, top_p, cond_delta=None, on_step=None, dev=None):
        with devices.autocast(dev, self.dtype):
            gens = [devices.generator(dev, s) for s in seeds]  # one per image, as the pipeline draws
            if self.reference:
                return reference_pattern(self.var, self.vae, B, labels, cfg=cfg, top_k=top_k, top_p=top_p,
                                         generator=gens, cond_delta=cond_delta, on_step=on_step)
            step = None if on_step is None else (lambda si, logits, idx, fh: on_step(si, idx))
            return generate(self.var, self.vae, B, labels, cfg=cfg, top_k=top_k, top_p=top_p, cond_delta=cond_delta,
                            generator=gens, on_step=step,
                            cfg_scales=self.cfg_scales)


def build_modes(var, vae, dev: torch.device, cfg_scales: int, kernels=DEFAULT_KERNELS,
                fast: autotune.SpeedMode | None = None) -> list[Mode]:
    """The reference pattern, then popyou's default, then the fast modes, each named by the flags that select it,
    then (CPU, `fast` given) `--fast`: the mode it picks, prepared and timed on its own. Every mode runs with
    `kernels` (exact mode's, as `popyou sample` tunes them)."""
    def prepared(dtype=torch.float32, quantize=None):
        v, d = copy.deepcopy(var), copy.deepcopy(vae)
        prepare_for_sampling(v, d, dev, dtype, quantize=quantize, kernels=kernels)
        return v, d

    skip = f"--cfg-scales {cfg_scales}"
    if dev.type == "cuda":  # the reference's way on a GPU is eager fp16 autocast; popyou's default there is bf16
        exact = prepared(torch.bfloat16)
        return [Mode("reference pattern, fp16 autocast", var, vae, torch.float16, reference=True),
                Mode("default (bf16 weights, CUDA graphs)", *exact, torch.bfloat16),
                Mode(skip, *exact, torch.bfloat16, cfg_scales=cfg_scales)]
    exact, int8 = prepared(), prepared(quantize="int8")
    modes = [Mode("reference pattern", var, vae, reference=True), Mode("exact", *exact),
             Mode("--quantize int8", *int8), Mode(skip, *exact, cfg_scales=cfg_scales)]
    if devices.cpu_info().native_bf16:
        int8_bf16 = prepared(torch.bfloat16, "int8")
        modes += [Mode("--dtype bf16", *prepared(torch.bfloat16), torch.bfloat16),
                  Mode("--dtype bf16 --quantize int8", *int8_bf16, torch.bfloat16),
                  Mode(f"--dtype bf16 --quantize int8 {skip}", *int8_bf16, torch.bfloat16, cfg_scales=cfg_scales)]
    else:
        modes.append(Mode(f"--quantize int8 {skip}", *int8, cfg_scales=cfg_scales))
    if fast is not None:
        modes.append(Mode(f"--fast (= {' '.join(fast.flags) or 'exact'})", *prepared(fast.dtype, fast.quantize),
                          fast.dtype))
    return modes


# ------------------------------------------------------------------------------------------ distance from exact
def distance_from_exact(modes: list[Mode], dev, *, n: int, label: int, cfg: float, top_k: int, top_p: float,
                        seed: int = 0) -> dict:
    """Per fast mode: token agreement with popyou's default mode (modes[1]: exact on a CPU) per scale (same seeds,
    free-running), and image PSNR."""
    exact = modes[1]
    labels = (torch.arange(n) + label) % exact.var.num_classes  # several classes: greedy images differ
    seeds = list(range(seed, seed + n))

    def run(mode):
        toks = {}
        img = mode.sample(n, labels, seeds, cfg=cfg, top_k=top_k, top_p=top_p, dev=dev,
                          on_step=lambda si, idx: toks.__setitem__(si, idx.cpu()))
        return [toks[k] for k in sorted(toks)], img.float().cpu()

    ref_toks, ref_img = run(exact)
    out = {}
    for mode in modes:
        if mode is exact or (mode.reference and dev.type == "cuda"):
            continue
        toks, img = run(mode)
        agree = [round((a == b).float().mean().item(), 4) for a, b in zip(toks, ref_toks)]
        mse = (img - ref_img).square().mean().item()
        out[mode.name] = {"token_agreement_per_scale": agree, "min_agreement": min(agree),
                          "psnr_db": round(10 * math.log10(1 / mse), 2) if mse > 0 else math.inf}
    return out


def _golden_tiny10():
    from popyou_cli.models.checkpoints import load_var, load_vqvae

    root = os.environ.get("POPYOU_GOLDEN_DIR") or Path(__file__).resolve().parents[3] / "shared" / "golden"
    folder = Path(root) / "var"
    if not (folder / "tiny10_var.safetensors").is_file():
        return None
    var, _ = load_var(str(folder / "tiny10_var.safetensors"))
    return var.eval(), load_vqvae(str(folder / "tiny_vae.safetensors"), patch_nums=var.config.patch_nums).eval()


# ------------------------------------------------------------------------------------------ the benchmark
def _tuned(var, vae, dev: torch.device, say) -> dict:
    """Prints and returns what `popyou sample` would run on this machine: exact mode's kernels and the --fast pick
    (measured now, or read from the cache; the environment variables that force them count)."""
    cpu = devices.cpu_info()
    if dev.type != "cpu":
        fast = autotune.fast_mode(var, vae, dev)
        say(f"--fast on {dev.type}: {fast.name} (with CUDA graphs; nothing measured)")
        return {"kernels": DEFAULT_KERNELS, "fast": fast, "machine": {}, "record": {"fast_mode": fast.name}}
    say(f"CPU: {cpu.summary()}")
    was_cached = autotune.cached(autotune.cache_key(var, vae)) is not None
    tuning = autotune.tune(var, vae)
    kernels, fast = autotune.exact_kernels(var, vae, dev), autotune.fast_mode(var, vae, dev)
    say(f"autotune ({'from the cache' if was_cached else 'measured now'}, {autotune.cache_path()}): "
        f"{tuning.summary()}")
    forced = [f"{k}={os.environ[k]}" for k in (autotune.KERNELS_ENV, autotune.FAST_MODE_ENV) if os.environ.get(k)]
    if forced:
        say(f"forced by {', '.join(forced)}: kernels {kernels.spelled()}, --fast {fast.name}")
    return {"kernels": kernels, "fast": fast, "machine": {"cpu_flags": sorted(cpu.flags)},
            "record": {**tuning.as_dict(), "cached": was_cached, "used_kernels": kernels.as_dict(),
                       "used_fast_mode": fast.name}}


def _timed(fn, dev) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). On a shared machine the CPU seconds move far less with other
    people's load than the wall time does (time slices lost to them do not count)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t, c = time.perf_counter(), time.process_time()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t, time.process_time() - c


def bench_sampling(*, depth: int = 16, batch_sizes: list[int] = (1, 4), repeats: int = 3, device: str = "auto",
                   threads: int = 0, tiny: bool = False, out: Path | None = None, console=None,
                   cfg_scales: int = 8, video_frames: int = 10, distances: bool = True) -> list[dict]:
    from popyou_cli.bench.common import machine_info, random_models

    dev = devices.resolve_device(device)
    if threads > 0:
        torch.set_num_threads(threads)

    def say(line: str) -> None:  # flushed: a long run's lines reach a log file as they are made
        console.print(line) if console is not None else print(line, flush=True)

    var, vae = random_models(depth, tiny, dev)
    model = "tiny" if tiny else f"VAR-d{depth} + VQ-VAE ch160"
    top_k = 8 if tiny else 900
    cfg, top_p, label = 1.5, 0.96, 1
    tuned = _tuned(var, vae, dev, say)
    modes = build_modes(var, vae, dev, cfg_scales, tuned["kernels"], tuned["fast"] if dev.type == "cpu" else None)
    opts = {"cfg": cfg, "top_k": top_k, "top_p": top_p, "dev": dev}
    rows = []
    for bs in batch_sizes:
        labels = torch.full((bs,), label)
        seeds = list(range(bs))
        if dev.type == "cuda" or bs == batch_sizes[0]:  # warm-up (kernels, allocator, graph capture), untimed
            for m in modes:
                m.sample(bs, labels, seeds, **opts)
        for _ in range(max(1, math.ceil(repeats / bs))):  # about `repeats` images per setting
            for m in modes:
                call = partial(m.sample, bs, labels, seeds, **opts)
                m.times.setdefault(bs, []).append(_timed(call, dev))
        ref = statistics.median(t for t, _ in modes[0].times[bs])
        ref_cpu = statistics.median(c for _, c in modes[0].times[bs])
        for m in modes:
            med = statistics.median(t for t, _ in m.times[bs])
            cpu = statistics.median(c for _, c in m.times[bs])
            rows.append({"model": model, "batch": bs, "mode": m.name, "median_s": round(med, 3),
                         "s_per_image": round(med / bs, 3), "vs_reference": round(ref / med, 2),
                         "cpu_s_per_image": round(cpu / bs, 3), "cpu_vs_reference": round(ref_cpu / cpu, 2),
                         "runs_s": [round(t, 3) for t, _ in m.times[bs]],
                         "runs_cpu_s": [round(c, 3) for _, c in m.times[bs]]})
            say(f"B={bs:<3} {m.name:<44} {med / bs:8.3f} s/image {ref / med:5.2f}x | CPU {cpu / bs:8.3f} s/image "
                f"{ref_cpu / cpu:5.2f}x   runs {rows[-1]['runs_s']}")
    video = []
    if video_frames > 0:  # the demo's beta video: one seed, one image per beta, batched as the demo does
        betas = torch.linspace(0.0, 2.0, video_frames)
        delta = torch.randn(1, var.config.embed_dim, generator=torch.Generator().manual_seed(0)).to(dev)
        delta = delta / delta.norm() * var.class_emb.weight.norm(dim=1).mean()
        chunk = min(video_frames, 8)
        for m in (modes[0], modes[1], modes[-1]):  # the reference, exact, --fast (the demo's default) on a CPU
            def frames(m=m):
                for s in range(0, video_frames, chunk):
                    b = betas[s:s + chunk]
                    m.sample(len(b), torch.full((len(b),), label), [0] * len(b), cond_delta=delta * b[:, None].to(dev),
                             **opts)
            sec, cpu = _timed(frames, dev)
            video.append({"mode": m.name, "frames": video_frames, "seconds": round(sec, 2),
                          "s_per_frame": round(sec / video_frames, 3), "cpu_seconds": round(cpu, 2)})
            say(f"beta video, {video_frames} frames  {m.name:<44} {sec:8.2f} s ({sec / video_frames:.3f} s/frame) "
                f"| CPU {cpu:8.2f} s")
    dist = {}
    if distances:
        dist[model] = distance_from_exact(modes, dev, n=2, label=label, cfg=cfg, top_k=top_k, top_p=top_p)
        golden = _golden_tiny10()
        if golden is not None:
            gmodes = build_modes(*golden, dev, cfg_scales)
            for name, kw in (("tiny10 greedy", {"top_k": 1, "top_p": 0.0}),
                             ("tiny10 top-k 8, top-p 0.9", {"top_k": 8, "top_p": 0.9})):
                dist[name] = distance_from_exact(gmodes, dev, n=32, label=3, cfg=cfg, **kw)
        for case, per_mode in dist.items():
            for name, d in per_mode.items():
                say(f"distance from exact, {case:<26} {name:<44} min token agreement {d['min_agreement']:.3f}  "
                    f"PSNR {d['psnr_db']} dB")
    result = {"benchmark": "sample", "machine": {**machine_info(dev), **tuned["machine"]}, "results": rows,
              "beta_video": video, "distance_from_exact": dist, "autotune": tuned["record"],
              "settings": {"cfg": cfg, "top_k": top_k, "top_p": top_p, "label": label, "cfg_scales": cfg_scales}}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return rows
