"""Start-up (issue: every command spent ~10 s starting): what a fresh `popyou` process imports. A mistyped option
is answered before torch is imported; sampling a pipeline imports neither transformers nor torch._dynamo. No
timings here: `popyou bench startup` measures them (BENCHMARKS.md)."""
import json
import os
import subprocess
import sys

import pytest

# `popyou ARGS` in a fresh interpreter, then the modules it had loaded, written at exit (after sys.exit too).
WRAPPER = """
import atexit, json, sys
atexit.register(lambda: print("MODULES " + json.dumps(sorted(sys.modules)), file=sys.stderr))
sys.argv = ["popyou", *sys.argv[1:]]
from popyou_cli.cli.app import main
main()
"""


def fresh_popyou(*args, cwd=None) -> tuple[int, str, set[str]]:
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"})
    lines = proc.stderr.splitlines()
    modules = next(json.loads(line[len("MODULES "):]) for line in lines if line.startswith("MODULES "))
    return proc.returncode, "\n".join(line for line in lines if not line.startswith("MODULES ")), set(modules)


@pytest.mark.parametrize("args, status, words", [
    (["sample", "--bogus"], 2, "no such option: --bogus"),
    (["sample", "a wizard", "--dtype", "fp64"], 1, "unknown dtype 'fp64'"),
    (["sample", "a wizard", "--top-k", "-3"], 1, "--top-k must be in 0..1_048_576"),
    (["sample", "a wizard", "--device", "cdua"], 1, "unknown device 'cdua'"),
    (["sample", "a wizard", "--more-smooth", "true"], 1, "--more-smooth is a flag"),
    (["finetune", "--data", "d", "--out", "o", "--preset", "tni"], 1, "unknown --preset 'tni'"),
    (["bench", "sample", "--arch", "huge"], 1, "unknown --arch 'huge'"),
])
def test_a_mistyped_option_is_answered_before_torch_is_imported(args, status, words, tmp_path):
    code, err, modules = fresh_popyou(*args, cwd=tmp_path)
    assert code == status and err.startswith("error: ") and words in err and len(err.splitlines()) == 1, err
    assert "torch" not in modules and "transformers" not in modules, sorted(m for m in modules if "torch" in m)


def test_help_imports_no_heavy_library(tmp_path):
    for args in (["--help"], ["sample", "--help"], ["bench", "startup", "--help"]):
        code, _, modules = fresh_popyou(*args, cwd=tmp_path)
        assert code == 0 and not modules & {"torch", "transformers", "diffusers", "open_clip", "gradio"}, args


@pytest.fixture(scope="module")
def imported_pipeline(tmp_path_factory):
    """A pipeline folder imported from a tiny checkpoint in the original PopYOU layout (SigLIP text tower)."""
    from popyou_cli.bench.startup import tiny_pipeline

    return tiny_pipeline(tmp_path_factory.mktemp("startup"))


def test_sampling_imports_neither_transformers_nor_dynamo(imported_pipeline, tmp_path):
    code, err, modules = fresh_popyou("sample", "a wizard funko pop", "--pipeline", imported_pipeline, "--n", 1,
                                      "--device", "cpu", "--out", tmp_path / "s")
    assert code == 0, err
    assert (tmp_path / "s" / "grid.png").is_file()
    assert "torch" in modules  # it did sample
    assert "torch._dynamo" not in modules and "transformers" not in modules, err
    assert not modules & {"diffusers", "open_clip", "gradio", "datasets", "accelerate", "peft"}


def test_class_sampling_imports_no_dynamo(tmp_path):
    code, err, modules = fresh_popyou("sample", "--var", "tiny", "--vae", "tiny", "--class-id", 1, "--n", 1,
                                      "--device", "cpu", "--out", tmp_path / "s")
    assert code == 0, err
    assert "torch._dynamo" not in modules and "transformers" not in modules


def test_bench_startup_reports_every_case(imported_pipeline, tmp_path):
    from helpers import invoke

    res = invoke("bench", "startup", "--runs", 1, "--pipeline", imported_pipeline, "--out", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "s.json").read_text())
    cases = {r["case"]: r for r in got["results"]}
    assert list(cases) == ["popyou --help", "a mistyped option", "1-image tiny sample"]
    assert "torch" not in cases["a mistyped option"]["heavy_modules"]
    assert "torch" in cases["1-image tiny sample"]["heavy_modules"]
    assert all(r["median_s"] > 0 and r["peak_rss_mib"] > 0 for r in cases.values())
    assert got["cpu"] and "CPU: " in res.output
