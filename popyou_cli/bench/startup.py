"""`popyou bench startup`: what a user waits for before popyou does any work. Whole `popyou` processes, each one
started fresh: `popyou --help`, a mistyped option (`popyou sample --bogus`) and a one-image sample of a tiny 64 px
pipeline (an original-PopYOU-layout checkpoint with tiny random weights, imported once, untimed). For each: the
median wall time of a few runs, the peak memory (VmHWM), and which heavy libraries the process imported.

The sample case runs once untimed first: its first run on a machine also measures and caches the CPU kernels
(models/autotune.py), which a user pays once, not at every start.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from popyou_cli.core.errors import PopyouError

HEAVY_MODULES = ("torch", "torch._dynamo", "transformers", "diffusers", "open_clip", "timm", "gradio", "datasets",
                 "accelerate", "peft", "scipy")
REPORT_ENV = "POPYOU_STARTUP_REPORT"

# The `popyou` console script, plus a report at exit: the heavy modules loaded and the peak memory.
_WRAPPER = f"""
import atexit, json, os, sys

def _report():
    try:
        kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(os.environ["{REPORT_ENV}"], "w") as f:
        json.dump({{"modules": [m for m in {HEAVY_MODULES!r} if m in sys.modules], "rss_kib": kib}}, f)

atexit.register(_report)
sys.argv = ["popyou", *sys.argv[1:]]
from popyou_cli.cli.app import main
main()
"""


def run_fresh(args: list[str], report: Path, expect: int = 0) -> dict:
    """One fresh `popyou ARGS` process: {"seconds", "rss_mib", "modules"}; a PopyouError if it exits otherwise
    than `expect`."""
    env = {**os.environ, REPORT_ENV: str(report), "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != expect:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PopyouError(f"popyou {' '.join(args[:2])} exited {proc.returncode}, not {expect}: {last[:300]}")
    got = json.loads(report.read_text())
    return {"seconds": seconds, "rss_mib": got["rss_kib"] / 1024, "modules": got["modules"]}


def tiny_pipeline(folder: Path) -> Path:
    """A pipeline folder imported from a tiny original-layout checkpoint (64 px, SigLIP text tower)."""
    from popyou_cli.bench.importing import make_original_like_checkpoint, text_encoder_folder
    from popyou_cli.infer.import_model import import_checkpoint

    text = text_encoder_folder(folder / "text", tiny=True)
    make_original_like_checkpoint(folder / "VARtext_v1.pth", text, tiny=True, layout="space")
    import_checkpoint(str(folder / "VARtext_v1.pth"), folder / "pipeline", text_encoder=str(text),
                      tokenizer=str(text))
    return folder / "pipeline"


def bench_startup(*, runs: int, pipeline: Path | None, out: Path | None, console) -> dict:
    from popyou_cli.core.devices import cpu_info

    with tempfile.TemporaryDirectory(prefix="popyou-bench-startup-") as tmp:
        tmp = Path(tmp)
        folder = Path(pipeline) if pipeline is not None else tiny_pipeline(tmp / "tiny")
        sample = ["sample", "a wizard funko pop", "--pipeline", str(folder), "--n", "1", "--device", "cpu",
                  "--out", str(tmp / "samples")]
        cases = {"popyou --help": (["--help"], 0), "a mistyped option": (["sample", "--bogus"], 2),
                 "1-image tiny sample": (sample, 0)}
        run_fresh(sample, tmp / "report.json")  # untimed: the first run on a machine caches its kernel choice
        results = []
        for name, (args, expect) in cases.items():
            got = [run_fresh(args, tmp / "report.json", expect) for _ in range(runs)]
            seconds = [g["seconds"] for g in got]
            results.append({"case": name, "args": args[:2], "median_s": round(statistics.median(seconds), 3),
                            "min_s": round(min(seconds), 3), "max_s": round(max(seconds), 3),
                            "peak_rss_mib": round(max(g["rss_mib"] for g in got)),
                            "heavy_modules": got[-1]["modules"]})
    cpu = cpu_info().model or "unknown CPU"
    result = {"cpu": cpu, "cpu_count": os.cpu_count(), "runs": runs, "python": sys.version.split()[0],
              "results": results}
    console.print(f"CPU: {cpu}, {os.cpu_count()} CPUs; {runs} fresh processes per case, median (min-max)",
                  highlight=False, markup=False)
    for r in results:
        heavy = ", ".join(r["heavy_modules"]) or "none"
        console.print(f"{r['case']:22s} {r['median_s']:6.2f} s ({r['min_s']:.2f}-{r['max_s']:.2f})  peak "
                      f"{r['peak_rss_mib']:5,} MiB  heavy imports: {heavy}", highlight=False, markup=False,
                      soft_wrap=True)
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=2))
    return result
