"""Same-machine comparison of popyou's sampler with the reference's inference pattern.

The reference VAR code cannot be vendored here, so this script re-creates its per-call work with popyou's own
modules: each block's AdaLN modulation recomputed at every scale, and a KV cache grown with torch.cat per scale
and per block. popyou's sampler instead computes the modulation once per call and writes into a preallocated
cache. Both paths must give identical greedy tokens; the script checks that, then times both in one run.

    OMP_NUM_THREADS=2 python benchmarks/reference_style_sampling.py --threads 2 --batch-sizes 1,4
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from popyou_cli.bench import random_models
from popyou_cli.models import var as var_mod


class CatKVCache:
    """The reference's cache: concatenate the new scale's keys and values onto the old ones."""

    def __init__(self, max_len: int):
        self.k = self.v = None

    def append(self, k, v):
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


def reference_style(var, vae, B, label, top_k, top_p, cfg=1.5, seed=0):
    """popyou's VAR.generate with the two reference behaviours swapped back in."""
    original_cache, original_mods = var_mod.KVCache, var._block_modulations
    calls = {"n": 0}

    class PerScaleMods(list):  # recompute block i's modulation each time the sampler reads it, as per scale
        def __init__(self, cond):
            super().__init__(original_mods(cond))
            self.cond = cond

        def __iter__(self):
            calls["n"] += 1
            return iter(original_mods(self.cond)) if calls["n"] > 1 else super().__iter__()

    var_mod.KVCache = CatKVCache
    var._block_modulations = PerScaleMods
    try:
        return var.generate(vae, B, label, cfg=cfg, top_k=top_k, top_p=top_p,
                            generator=torch.Generator().manual_seed(seed), return_fhat=True)
    finally:
        var_mod.KVCache = original_cache
        del var._block_modulations


def popyou_style(var, vae, B, label, top_k, top_p, cfg=1.5, seed=0):
    return var.generate(vae, B, label, cfg=cfg, top_k=top_k, top_p=top_p,
                        generator=torch.Generator().manual_seed(seed), return_fhat=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    var, vae = random_models(16, a.tiny, torch.device("cpu"))
    top_k = 8 if a.tiny else 900
    f1, f2 = popyou_style(var, vae, 1, 1, top_k=1, top_p=0), reference_style(var, vae, 1, 1, top_k=1, top_p=0)
    print(f"greedy f_hat identical: {torch.equal(f1, f2)} (max diff {(f1 - f2).abs().max().item():.2e})")
    for bs in [int(b) for b in a.batch_sizes.split(",")]:
        times = {"reference-style": [], "popyou": []}
        for _ in range(a.repeats):  # round-robin so that load drifts hit both alike
            for name, fn in (("reference-style", reference_style), ("popyou", popyou_style)):
                t = time.perf_counter()
                f = fn(var, vae, bs, 1, top_k=top_k, top_p=0.96)
                vae.decode_fhat(f)
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"B={bs}: reference-style {med['reference-style']:.3f} s, popyou {med['popyou']:.3f} s "
              f"({med['reference-style'] / med['popyou']:.3f}x), runs {times}")


if __name__ == "__main__":
    main()
