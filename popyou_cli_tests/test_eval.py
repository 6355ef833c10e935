"""`popyou eval` on the quick-start's pipeline: metrics, report, prompts from a file, bad input."""
import json
import shutil

import numpy as np
import pytest

from helpers import invoke


@pytest.fixture(scope="module")
def work(quickstart):
    work, proc = quickstart
    assert proc.returncode == 0, proc.stderr[-2000:]
    return work


def test_eval_with_prompt_file(work, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a wizard funko pop\na knight funko pop\na robot funko pop\n")
    out = tmp_path / "eval"
    res = invoke("eval", "--pipeline", work / "txt" / "pipeline", "--prompts", prompts, "--out", out, "--siglip-fid")
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_prompts"] == 3 and m["n_reference_images"] > 3
    for key in ("siglip_score", "fid", "kid", "fid_siglip", "images_per_s"):
        assert np.isfinite(m[key]), key
    assert m["images_per_s"] > 0 and m["fid"] >= 0
    assert "siglip_score_dataset" not in m  # the dataset's images do not pair with prompts from a file
    nll = m["heldout_nll"]
    assert 0 < nll["right"] < 10 and 0 < nll["shuffled"] < 10 and nll["rows"] > 0
    report = (out / "report.md").read_text()
    assert all(p in report for p in prompts.read_text().split("\n") if p)
    assert len(list((out / "images").glob("*.png"))) == 3


def test_eval_bad_input(work, tmp_path):
    res = invoke("eval", "--out", tmp_path / "o")
    assert res.exit_code == 1 and "--pipeline" in res.output
    broken = tmp_path / "broken"
    shutil.copytree(work / "txt" / "pipeline", broken)
    (broken / "pipeline.json").unlink()
    res = invoke("eval", "--pipeline", broken, "--out", tmp_path / "o")
    assert res.exit_code == 1 and "not a popyou pipeline folder" in res.output
    res = invoke("eval", "--pipeline", work / "txt" / "pipeline", "--data", tmp_path / "nothing", "--out", tmp_path / "o")
    assert res.exit_code == 1 and "not there" in res.output
