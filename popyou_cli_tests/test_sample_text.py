"""Text-to-image `popyou sample` with the quick-start's pipeline: files, seeds, batching, beta sweep, bad input."""
import json
import shutil
from collections import namedtuple

import numpy as np
import pytest
from PIL import Image

from helpers import invoke, one_line_error


@pytest.fixture(scope="module")
def pipe(quickstart):
    work, proc = quickstart
    assert proc.returncode == 0, proc.stderr[-2000:]
    return work / "txt" / "pipeline"


def _png(path):
    return np.asarray(Image.open(path))


def test_prompts_batched_named_and_reproducible(pipe, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a wizard funko pop\na knight funko pop\n\n")  # trailing blank lines end the file: fine
    a, b = tmp_path / "a", tmp_path / "b"
    res = invoke("sample", "--pipeline", pipe, "--prompt-file", prompts, "a pirate funko pop", "--n", 2, "--batch-size", 4,
                 "--seed", 5, "--out", a)
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in (a / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in recs] == ["a pirate funko pop"] * 2 + ["a wizard funko pop"] * 2 + ["a knight funko pop"] * 2
    assert {r["path"] for r in recs} == {f"p{p:04d}_seed{s}.png" for p in range(3) for s in (5, 6)}
    assert all(r["cfg"] == 1.5 and r["class_id"] == 10 for r in recs)  # the pipeline's sampling defaults
    # the same prompt and seed alone, in another batch: the same image (up to one level of decoder rounding)
    assert invoke("sample", "a wizard funko pop", "--pipeline", pipe, "--n", 1, "--seed", 6, "--out", b).exit_code == 0
    assert np.abs(_png(a / "p0001_seed6.png").astype(int) - _png(b / "p0000_seed6.png")).max() <= 1
    assert not np.array_equal(_png(a / "p0000_seed5.png"), _png(a / "p0000_seed6.png"))  # the seed matters


def test_beta_sweep_strip_and_mp4(pipe, tmp_path):
    from popyou_cli.infer.video import read_mp4

    res = invoke("sample", "a wizard funko pop", "--pipeline", pipe, "--beta-sweep", "0:2:4", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    frames = [_png(tmp_path / f"beta_{i:03d}.png") for i in range(4)]
    assert _png(tmp_path / "beta_strip.png").shape[1] > 4 * 64
    video = read_mp4(tmp_path / "beta_sweep.mp4")
    assert len(video) == 4 and video[0].size == (64, 64)
    assert any(not np.array_equal(np.asarray(video[0]), np.asarray(v)) for v in video[1:])
    betas = [json.loads(x)["beta"] for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert betas == pytest.approx([0, 2 / 3, 4 / 3, 2])
    assert any(not np.array_equal(frames[0], f) for f in frames[1:])
    # beta 0 is the class alone: equal to sampling with --beta 0
    res = invoke("sample", "another prompt entirely", "--pipeline", pipe, "--beta", 0, "--n", 1, "--out", tmp_path / "b0")
    assert res.exit_code == 0
    assert np.abs(_png(tmp_path / "b0" / "p0000_seed0.png").astype(int) - frames[0]).max() <= 1


def _one_line_error(res, text):
    line = one_line_error(res)
    assert text in line, line


def test_bad_input(pipe, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _one_line_error(invoke("sample", "", "--pipeline", pipe, "--out", out), "prompt 1 is empty")
    blank = tmp_path / "blank.txt"
    blank.write_text("a wizard\n\na knight\n")
    res = invoke("sample", "--prompt-file", blank, "--pipeline", pipe, "--n", 1, "--out", tmp_path / "blank-out")
    assert res.exit_code == 0 and "skipped 1 blank line(s)" in res.output  # skipped and counted, not an error
    _one_line_error(invoke("sample", "a wizard", "--out", out), "popyou import")  # offline, nothing cached
    broken = tmp_path / "broken"
    shutil.copytree(pipe, broken)
    (broken / "adapter.safetensors").unlink()
    _one_line_error(invoke("sample", "a wizard", "--pipeline", broken, "--out", out), "adapter")
    wrong = tmp_path / "wrong"
    shutil.copytree(pipe, wrong)
    cfg = json.loads((wrong / "adapter.json").read_text())
    cfg["config"]["var_dim"] *= 2  # an adapter for a twice-as-wide VAR
    (wrong / "adapter.json").write_text(json.dumps(cfg))
    _one_line_error(invoke("sample", "a wizard", "--pipeline", wrong, "--out", out), "adapter")
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr("popyou_cli.infer.options.shutil.disk_usage", lambda p: Usage(10**6, 10**6 - 1000, 1000))
    _one_line_error(invoke("sample", "a wizard", "--pipeline", pipe, "--n", 100, "--out", out), "GiB free")
    assert not any(out.glob("*.png")) and not (out / "samples.jsonl").exists()
