"""Same-run comparison of popyou's sampling with the real reference code (FoundationVision/VAR, MIT licence), which
this script imports from a checkout you give it; nothing of it is copied into popyou.

The same random VAR-d16 + VQ-VAE weights (built by the reference's own `build_vae_var`, then saved in the official
file layout) are sampled by the reference's `autoregressive_infer_cfg` and by popyou's public API
(`Pipeline.from_model(var, vae)` in exact mode and with `fast=True`), round-robin so that load on the machine hits
every mode alike, decode included; the median of `--repeats` runs, in seconds per image. A greedy image of each
side is compared first (it must agree within one level per channel).

    git clone https://github.com/FoundationVision/VAR /tmp/VAR      # or any checkout of it
    python benchmarks/reference_code_comparison.py --reference /tmp/VAR --threads 2 --batch-sizes 1,4 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

CFG, TOP_K, TOP_P, LABEL = 1.5, 900, 0.96, 207  # the reference demo's sampling settings, one ImageNet class


def build_reference(repo: Path, depth: int):
    """The reference's VQ-VAE and VAR with random weights. Its builder switches off the layers' own initialisation
    (for speed, it re-initialises VAR itself), so the VQ-VAE gets a plain normal initialisation here."""
    sys.path.insert(0, str(repo))
    from models import build_vae_var  # the reference's own code, from the checkout

    torch.manual_seed(0)
    vae, var = build_vae_var(device="cpu", depth=depth, flash_if_available=False, fused_if_available=False,
                             init_adaln_gamma=1e-3)
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        vae.quantize.embedding.weight.normal_(std=0.1)
    return vae.eval(), var.eval()


def median_seconds(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, required=True, help="a checkout of FoundationVision/VAR")
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from popyou_cli.bench.common import machine_info
    from popyou_cli.core.devices import cpu_info
    from popyou_cli.infer.pipeline import Pipeline

    ref_vae, ref_var = build_reference(args.reference, args.depth)
    with tempfile.TemporaryDirectory(prefix="popyou-vs-reference-") as tmp:
        var_file, vae_file = Path(tmp) / f"var_d{args.depth}.pth", Path(tmp) / "vae_ch160v4096z32.pth"
        torch.save(ref_var.state_dict(), var_file)
        torch.save(ref_vae.state_dict(), vae_file)
        exact = Pipeline.from_model(str(var_file), str(vae_file), device="cpu")
        fast = Pipeline.from_model(str(var_file), str(vae_file), device="cpu", fast=True)

    def reference(B: int, seed: int, top_k: int = TOP_K, top_p: float = TOP_P) -> torch.Tensor:
        with torch.inference_mode():
            img = ref_var.autoregressive_infer_cfg(B=B, label_B=LABEL, g_seed=seed, cfg=CFG, top_k=top_k, top_p=top_p)
        return img.mul(255).round().to(torch.uint8)

    def popyou(pipe, B: int, seed: int, top_k: int = TOP_K, top_p: float = TOP_P):
        return pipe(None, n=B, class_id=LABEL, seed=seed, cfg=CFG, top_k=top_k, top_p=top_p, batch_size=B)

    import numpy as np

    greedy_ref = reference(1, 0, top_k=1, top_p=0.0)[0].permute(1, 2, 0).numpy().astype(int)
    greedy_pop = np.asarray(popyou(exact, 1, 0, top_k=1, top_p=0.0)[0]).astype(int)
    greedy_levels = int(np.abs(greedy_ref - greedy_pop).max())

    modes = {"reference code": lambda B: reference(B, 1), "popyou exact": lambda B: popyou(exact, B, 1),
             f"popyou --fast (= {fast.fast_mode})": lambda B: popyou(fast, B, 1)}
    rows = []
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        for fn in modes.values():
            fn(B)  # warm-up: kernels, allocator, the autotune cache
        times = {name: [] for name in modes}
        for _ in range(args.repeats):  # round-robin
            for name, fn in modes.items():
                times[name] += median_seconds(lambda: fn(B), 1)
        ref_s = statistics.median(times["reference code"]) / B
        for name, ts in times.items():
            per_image = statistics.median(ts) / B
            rows.append({"batch": B, "mode": name, "s_per_image": round(per_image, 3),
                         "vs_reference": round(ref_s / per_image, 2), "runs": [round(t, 3) for t in ts]})
    cpu = cpu_info()
    result = {"machine": {**machine_info(torch.device("cpu")), "cpu_flags": sorted(cpu.flags)},
              "model": f"VAR-d{args.depth} + VQ-VAE ch160, random weights", "greedy_max_level_difference": greedy_levels,
              "settings": {"cfg": CFG, "top_k": TOP_K, "top_p": TOP_P, "class": LABEL, "repeats": args.repeats},
              "results": rows}
    print(f"{cpu.model} ({', '.join(sorted(cpu.flags))}), torch {torch.__version__}, {args.threads} threads; greedy "
          f"image: max difference {greedy_levels} level(s)")
    print("| batch | mode | s/image | vs reference |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['mode']} | {r['s_per_image']:.2f} | {r['vs_reference']:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
