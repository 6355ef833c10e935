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
    res = invoke("eval", "--pipeline", work / "txt" / "pipeline", "--prompt-file", prompts, "--out", out, "--siglip-fid")
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


def test_report_says_what_the_numbers_mean(work, tmp_path):
    import re

    out = tmp_path / "eval"
    res = invoke("eval", "--pipeline", work / "txt" / "pipeline", "--n-prompts", 4, "--out", out)
    assert res.exit_code == 0, res.output
    assert "eval: generating 4/4 images" in res.output  # progress, even in a log
    m = json.loads((out / "metrics.json").read_text())
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, page):  # one outline, two renderings
        assert "What the numbers say" in text and "Settings to reproduce" in text
        assert "text conditioning" in text and "nats/token" in text and "SigLIP" in text
        assert f"{m['heldout_nll']['right']:.3f}" in text
        assert not re.search(r"\d\.\d{6,}", text), "unrounded numbers"  # json.dumps' 17 digits are gone
        assert "popyou eval --pipeline" in text and "--n-prompts 4" in text
    # the data set's own image of each held-out prompt beside the generated one, at native size
    assert (out / "images" / "data_0003.png").is_file() and "images/data_0003.png" in md
    assert "image-rendering:pixelated" in page and 'width="128"' in page  # 64 px shown at exactly 2x
    # the FID reference features are cached next to the training data and reused
    assert list((work / "enc").glob(".popyou-fid-stats-*.npz"))
    again = invoke("eval", "--pipeline", work / "txt" / "pipeline", "--n-prompts", 4, "--out", tmp_path / "again")
    assert again.exit_code == 0, again.output
    m2 = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert m2["reference_cached"] is True and m2["fid"] == m["fid"]


def test_eval_scores_existing_samples_without_training_data(work, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(work / "txt" / "pipeline", pipe)
    cfg = json.loads((pipe / "pipeline.json").read_text())
    cfg["train"]["data"] = str(tmp_path / "gone")  # the training data is not needed
    (pipe / "pipeline.json").write_text(json.dumps(cfg))
    out = tmp_path / "scored"
    res = invoke("eval", "--images", work / "samples", "--pipeline", pipe, "--out", out)
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["mode"] == "existing images" and m["n_images"] == 4 and np.isfinite(m["siglip_score"])
    assert "fid" not in m and "heldout_nll" not in m and "images_per_s" not in m  # nothing regenerated
    res = invoke("eval", "--images", work / "samples", "--pipeline", pipe, "--reference", work / "data",
                 "--out", tmp_path / "with-fid")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "with-fid" / "metrics.json").read_text())
    assert np.isfinite(m["fid"]) and m["n_reference_images"] == 48
    assert "existing images" in (tmp_path / "with-fid" / "report.md").read_text()
    res = invoke("eval", "--images", tmp_path, "--out", tmp_path / "x")
    assert res.exit_code == 1 and "samples.jsonl" in res.output


def test_verdicts_state_the_finding_with_its_numbers():
    from popyou_cli.report import render_html, render_markdown, verdicts

    lines = verdicts({"heldout_nll": {"right": 3.1927, "shuffled": 3.1922, "class_only": 3.4, "rows": 50}})
    assert "text conditioning has no measurable effect: NLL right 3.193 ≈ shuffled 3.192" in lines[0]
    lines = verdicts({"heldout_nll": {"right": 2.9, "shuffled": 3.2, "class_only": 3.3, "rows": 50}})
    assert lines[0].startswith("text conditioning works") and "2.900 < shuffled 3.200" in lines[0]
    blocks = [("title", "t"), ("list", ["a [b] :end: <c>"]), ("code", "popyou eval --out x")]
    assert "a [b] :end: <c>" in render_markdown(blocks) and "a [b] :end: &lt;c&gt;" in render_html(blocks)
