"""What an adversarial probe broke in `sample` and `eval`, kept fixed: the Python API holds alpha and beta to the
CLI's bounds; a bad pipeline.json default is named as pipeline.json names it; warnings are one line. Tiny, CPU,
offline."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import invoke, one_line_error

REPO = Path(__file__).resolve().parent.parent
CLASS = ["sample", "--var", "tiny", "--vae", "tiny", "--class-id", 1, "--n", 1, "--device", "cpu"]


# ------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("given,message", [
    (dict(alpha=500.0), "--alpha must be a finite number in [-100, 100] (got 500)"),
    (dict(beta=-1e9), "--beta must be a finite number in [-100, 100] (got -1e+09)"),
    (dict(beta=float("nan")), "--beta must be a finite number (got nan)"),
])
def test_the_python_api_bounds_alpha_and_beta_like_the_cli(given, message):
    from popyou_cli import Pipeline
    from popyou_cli.core.errors import PopyouError

    pipe = Pipeline.from_model("tiny", "tiny", device="cpu")
    with pytest.raises(PopyouError) as e:
        pipe(None, class_id=1, **given)
    assert str(e.value) == message
    assert len(pipe(None, class_id=1, alpha=100.0, beta=-100.0)) == 1  # the bounds themselves are fine


def test_a_bad_pipeline_default_is_named_as_pipeline_json_names_it(work, tmp_path):
    pipe = shutil.copytree(work / "txt" / "pipeline", tmp_path / "pipeline")
    cfg = json.loads((pipe / "pipeline.json").read_text())
    for key, value, message in (("cfg", -1, "pipeline.json's sampling.cfg must be >= 0 (got -1)"),
                                ("beta", 500, "pipeline.json's sampling.beta must be a finite number in [-100, 100]")):
        (pipe / "pipeline.json").write_text(json.dumps({**cfg, "sampling": {**cfg["sampling"], key: value}}))
        line = one_line_error(invoke("sample", "a wizard funko pop", "--pipeline", pipe, "--out", tmp_path / key))
        assert message in line and f"--{key}" not in line, line
        given = {"cfg": "1.5", "beta": "1"}[key]  # the flag wins over pipeline.json
        assert invoke("sample", "a wizard funko pop", "--pipeline", pipe, f"--{key}", given, "--n", 1,
                      "--out", tmp_path / key).exit_code == 0


# ------------------------------------------------------------------------------------------ what stderr shows
def test_a_warning_is_one_line_without_a_library_path(tmp_path):
    env = {**os.environ, "POPYOU_CACHE": str(tmp_path / "file" / "cache"), "HF_HUB_OFFLINE": "1"}
    (tmp_path / "file").write_text("not a folder")  # the kernel cache cannot be written: a warning
    proc = subprocess.run([sys.executable, "-m", "popyou_cli", *map(str, CLASS), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warned = [ln for ln in proc.stderr.splitlines() if "could not write" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning: could not write"), proc.stderr
    assert ".py:" not in proc.stderr and "RuntimeWarning" not in proc.stderr, proc.stderr
