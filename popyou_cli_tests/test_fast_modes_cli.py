"""The opt-in fast modes as users reach them: `--quantize` and `--cfg-scales` of sample, eval and the demo, on the
quick-start's tiny text pipeline. Each runs, repeats itself for a seed, differs from exact mode only as documented,
and is recorded where the images are (samples.jsonl, metrics.json, the demo's reproduce command)."""
import json
import shlex

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers import invoke, one_line_error
from popyou_cli.cli.app import app

PROMPT = "a wizard funko pop"


@pytest.fixture(scope="module")
def folder(quickstart):
    work, proc = quickstart
    assert proc.returncode == 0, proc.stderr[-2000:]
    return work / "txt" / "pipeline"


def _sample(folder, out, *flags, n=8):
    """n images (seeds 1..n) with the full distribution (no top-k/top-p): a token moved by a fast mode shows."""
    res = invoke("sample", PROMPT, "--pipeline", folder, "--n", n, "--seed", 1, "--top-k", 0, "--top-p", 0,
                 "--device", "cpu", "--out", out, *flags)
    assert res.exit_code == 0, res.output
    return np.stack([np.asarray(Image.open(out / f"p0000_seed{1 + k}.png")) for k in range(n)]).astype(int)


def test_sample_quantize_int8_repeats_and_stays_near_exact(folder, tmp_path):
    exact = _sample(folder, tmp_path / "exact")
    int8 = _sample(folder, tmp_path / "int8", "--quantize", "int8")
    again = _sample(folder, tmp_path / "int8-again", "--quantize", "INT8")  # any case, like --dtype
    assert np.array_equal(int8, again)
    # int8 rounding of the transformer's layers moves a sampled token now and then (else the mode did nothing);
    # an image whose tokens all agree is pixel-identical, and most do
    same = [np.array_equal(a, b) for a, b in zip(int8, exact)]
    assert not all(same) and sum(same) >= len(same) // 2, same
    rec = json.loads((tmp_path / "int8" / "samples.jsonl").read_text().splitlines()[0])
    assert rec["quantize"] == "int8" and rec["cfg_scales"] is None
    assert json.loads((tmp_path / "exact" / "samples.jsonl").read_text().splitlines()[0])["quantize"] is None


def test_sample_cfg_scales_is_guidance_on_the_first_k_scales(folder, tmp_path):
    from popyou_cli import Pipeline

    n_scales = len(Pipeline.from_pretrained(str(folder), device="cpu").var.config.patch_nums)
    assert n_scales >= 3
    guided = _sample(folder, tmp_path / "guided", "--cfg", 3)
    assert np.array_equal(_sample(folder, tmp_path / "all", "--cfg", 3, "--cfg-scales", n_scales), guided)
    unguided = _sample(folder, tmp_path / "none", "--cfg", 0)
    assert np.array_equal(_sample(folder, tmp_path / "zero", "--cfg", 3, "--cfg-scales", 0), unguided)
    # the ramp gives scale 0 no guidance, so K=2 guides scale 1 only: between the two, and unlike either
    some = _sample(folder, tmp_path / "some", "--cfg", 3, "--cfg-scales", 2)
    assert not np.array_equal(some, guided) and not np.array_equal(some, unguided)
    assert json.loads((tmp_path / "some" / "samples.jsonl").read_text().splitlines()[0])["cfg_scales"] == 2


def test_fast_mode_flags_refuse_bad_values_in_one_line(folder, tmp_path):
    msg = one_line_error(invoke("sample", PROMPT, "--pipeline", folder, "--quantize", "int4", "--out", tmp_path))
    assert "--quantize" in msg and "int8" in msg and "bf16" in msg
    msg = one_line_error(invoke("sample", PROMPT, "--pipeline", folder, "--cfg-scales", -1, "--out", tmp_path))
    assert "--cfg-scales must be in 0..64 (got -1)" in msg
    msg = one_line_error(invoke("eval", "--images", tmp_path, "--quantize", "int8", "--out", tmp_path / "e"))
    assert "drop --quantize/--cfg-scales" in msg
    for command in ("sample", "eval", "demo"):
        text = " ".join(CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output.split())
        assert "--quantize" in text and "--cfg-scales" in text and "--fast" in text, command


def test_eval_records_and_reproduces_the_fast_modes(folder, tmp_path):
    res = invoke("eval", "--pipeline", folder, "--n-prompts", 4, "--batch-size", 4, "--quantize", "int8",
                 "--cfg-scales", 5, "--max-reference", 8, "--device", "cpu", "--out", tmp_path / "e")
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["sampling"]["quantize"] == "int8" and metrics["sampling"]["cfg_scales"] == 5
    args = shlex.split(metrics["reproduce"])
    assert args[args.index("--quantize") + 1] == "int8" and args[args.index("--cfg-scales") + 1] == "5"


def test_demo_in_a_fast_mode_says_so_and_its_command_reproduces_it(folder, tmp_path):
    from popyou_cli import Pipeline
    from popyou_cli.infer.demo import Demo

    pipe = Pipeline.from_pretrained(str(folder), device="cpu", quantize="int8")
    demo = Demo(pipe, str(folder), device="cpu", work_dir=tmp_path / "work", cfg_scales=4)
    assert demo.speed_mode() == "fast mode: --quantize int8, guidance on the first 4 scales"
    assert Demo(Pipeline.from_pretrained(str(folder), device="cpu"), str(folder)).speed_mode() == "exact mode"
    gallery, _, command = demo.images(PROMPT, 1.2, "9", 2, 2.0, 0, 0.0, False, progress=lambda *a, **k: None)
    args = shlex.split(command)
    assert args[args.index("--quantize") + 1] == "int8" and args[args.index("--cfg-scales") + 1] == "4"
    res = invoke(*args[1:-2], "--out", tmp_path / "cli")
    assert res.exit_code == 0, res.output
    for k, (img, _) in enumerate(gallery):
        assert np.array_equal(np.asarray(img), np.asarray(Image.open(tmp_path / "cli" / f"p0000_seed{9 + k}.png")))


# ------------------------------------------------------------------------------------------ --fast
def test_sample_fast_records_the_mode_it_picked(folder, tmp_path, monkeypatch):
    """--fast as measured here (a cache of its own): a candidate, recorded; forced: the same images as the mode's
    own flags, recorded by name."""
    from popyou_cli.models import autotune

    monkeypatch.setenv("POPYOU_CACHE", str(tmp_path / "cache"))
    _sample(folder, tmp_path / "measured", "--fast", n=2)
    rec = json.loads((tmp_path / "measured" / "samples.jsonl").read_text().splitlines()[0])
    assert rec["fast"] in autotune.FAST_CHOICES
    assert (tmp_path / "cache" / autotune.CACHE_FILE).is_file()
    monkeypatch.setenv(autotune.FAST_MODE_ENV, "int8")
    fast = _sample(folder, tmp_path / "fast", "--fast", n=4)
    assert np.array_equal(fast, _sample(folder, tmp_path / "named", "--quantize", "int8", n=4))
    rec = json.loads((tmp_path / "fast" / "samples.jsonl").read_text().splitlines()[0])
    assert (rec["fast"], rec["quantize"], rec["dtype"]) == ("int8", "int8", "fp32")
    exact = json.loads((tmp_path / "named" / "samples.jsonl").read_text().splitlines()[0])
    assert exact["fast"] is None  # --fast not asked
    msg = one_line_error(invoke("sample", PROMPT, "--pipeline", folder, "--fast", "--quantize", "int8", "--out",
                                tmp_path / "both"))
    assert "--fast picks --dtype and --quantize itself" in msg


def test_eval_fast_records_the_mode_and_reproduces_it_by_its_flags(folder, tmp_path, monkeypatch):
    from popyou_cli.models import autotune

    monkeypatch.setenv("POPYOU_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(autotune.FAST_MODE_ENV, "bf16+int8")
    res = invoke("eval", "--pipeline", folder, "--n-prompts", 4, "--batch-size", 4, "--fast", "--max-reference", 8,
                 "--device", "cpu", "--out", tmp_path / "e")
    assert res.exit_code == 0, res.output
    sampling = json.loads((tmp_path / "e" / "metrics.json").read_text())["sampling"]
    assert (sampling["fast"], sampling["quantize"], sampling["dtype"]) == ("bf16+int8", "int8", "bf16")
    # the reproduce command names the mode's flags, not --fast (which may pick differently on another machine)
    args = shlex.split(json.loads((tmp_path / "e" / "metrics.json").read_text())["reproduce"])
    assert args[args.index("--dtype") + 1] == "bf16" and args[args.index("--quantize") + 1] == "int8"
    assert "--fast" not in args
    msg = one_line_error(invoke("eval", "--images", tmp_path, "--fast", "--out", tmp_path / "e2"))
    assert "drop --quantize/--cfg-scales/--fast" in msg


def test_demo_fast_header_and_command_name_the_pick(folder, tmp_path, monkeypatch):
    from popyou_cli import Pipeline
    from popyou_cli.models import autotune
    from popyou_cli.infer.demo import Demo

    monkeypatch.setenv(autotune.FAST_MODE_ENV, "bf16+int8")
    pipe = Pipeline.from_pretrained(str(folder), device="cpu", fast=True)
    demo = Demo(pipe, str(folder), device="cpu", work_dir=tmp_path / "work")
    assert demo.speed_mode() == "fast mode: --fast picked bf16+int8 (--dtype bf16 --quantize int8)"
    gallery, _, command = demo.images(PROMPT, 1.2, "9", 2, 2.0, 0, 0.0, False, progress=lambda *a, **k: None)
    args = shlex.split(command)
    assert args[args.index("--dtype") + 1] == "bf16" and args[args.index("--quantize") + 1] == "int8"
    res = invoke(*args[1:-2], "--out", tmp_path / "cli")
    assert res.exit_code == 0, res.output
    for k, (img, _) in enumerate(gallery):
        assert np.array_equal(np.asarray(img), np.asarray(Image.open(tmp_path / "cli" / f"p0000_seed{9 + k}.png")))
    monkeypatch.setenv(autotune.FAST_MODE_ENV, "exact")
    exact = Demo(Pipeline.from_pretrained(str(folder), device="cpu", fast=True), str(folder))
    assert exact.speed_mode() == "exact mode (--fast's pick for this machine)"
    assert "--dtype" not in exact.sample_command(PROMPT, demo.sampling(None, None, None, False), 1, n=1, beta=1.0)
    bf16 = Demo(Pipeline.from_pretrained(str(folder), device="cpu", dtype="bf16"), str(folder), dtype="bf16")
    assert bf16.speed_mode() == "fast mode: --dtype bf16"  # not exact mode, though no --fast
