"""Same-machine comparison of popyou's exact sampling mode with the reference's inference pattern, standalone.

The reference VAR code cannot be vendored here, so `popyou_cli.bench.sampling.reference_pattern` re-creates its
per-call work with popyou's own (unprepared) modules: each block's AdaLN modulation recomputed at every scale, a KV
cache grown with torch.cat per scale and block, plain nn.Linear (MKL sgemm), the decoder's nearest-upsample-then-
convolve in NCHW. popyou's exact mode is `prepare_for_sampling` (models/fast.py) on a copy of the same weights.
The script checks that both give identical greedy tokens, then times both round-robin in one run.
`popyou bench sample` runs the same comparison together with every fast mode.

    OMP_NUM_THREADS=2 python benchmarks/reference_style_sampling.py --threads 2 --batch-sizes 1,4
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from popyou_cli.bench.common import random_models
from popyou_cli.bench.sampling import reference_pattern
from popyou_cli.models.fast import prepare_for_sampling
from popyou_cli.models.generate import generate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    var, vae = random_models(16, a.tiny, torch.device("cpu"))
    fast_var, fast_vae = copy.deepcopy(var), copy.deepcopy(vae)
    prepare_for_sampling(fast_var, fast_vae, "cpu")
    top_k = 8 if a.tiny else 900

    def reference(B, **kw):
        gens = [torch.Generator().manual_seed(i) for i in range(B)]
        return reference_pattern(var, vae, B, torch.ones(B, dtype=torch.long), cfg=1.5, generator=gens, **kw)

    def exact(B, top_k, top_p, on_step=None):
        gens = [torch.Generator().manual_seed(i) for i in range(B)]
        step = None if on_step is None else (lambda si, logits, idx, fh: on_step(si, idx))
        return generate(fast_var, fast_vae, B, 1, cfg=1.5, top_k=top_k, top_p=top_p, generator=gens, on_step=step)

    got = {"reference pattern": [], "exact": []}
    reference(1, top_k=1, top_p=0.0, on_step=lambda si, idx: got["reference pattern"].append(idx))
    exact(1, top_k=1, top_p=0.0, on_step=lambda si, idx: got["exact"].append(idx))
    same = all(torch.equal(x, y) for x, y in zip(*got.values()))
    print(f"greedy tokens identical at every scale: {same}")
    for bs in [int(b) for b in a.batch_sizes.split(",")]:
        times = {"reference pattern": [], "exact": []}
        for _ in range(a.repeats):  # round-robin so that load drifts hit both alike
            for name, fn in (("reference pattern", reference), ("exact", exact)):
                t = time.perf_counter()
                fn(bs, top_k=top_k, top_p=0.96)
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"B={bs}: reference pattern {med['reference pattern']:.3f} s, exact {med['exact']:.3f} s "
              f"({med['reference pattern'] / med['exact']:.3f}x), runs {times}")


if __name__ == "__main__":
    main()
