"""`popyou gen-data` on the tiny offline preset: rows, metadata, remaking one image, resume after a real SIGKILL,
growing n, two processes, bad input. CPU only; the CLI runs in-process except where a real process is the point."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

import helpers
from helpers import invoke as run_cli, kill_after_first_shard
from popyou_cli.data.prompts import default_scheme, make_prompt
from popyou_cli.data.gen_data import gen_data, image_seed, remake_image
from popyou_cli.store import load_stage, read_manifest

REPO = Path(__file__).resolve().parent.parent
# 32 px, 4 rows a shard: many shards from few rows, so resume and the split over processes are exercised.
# --device cpu: the reference, the subprocesses and remake_image must all run on one kind of device.
OPTS = {"--preset": "tiny", "--image-size": "32", "--shard-size": "4", "--batch-size": "4", "--seed": "7", "--device": "cpu"}


def opts(**changes) -> list[str]:
    """The common options with some changed: opts(seed=8) -> [..., "--seed", "8", ...]."""
    merged = {**OPTS, **{"--" + k.replace("_", "-"): str(v) for k, v in changes.items()}}
    return [x for item in merged.items() for x in item] + ["--no-progress"]


COMMON = opts()
N_REF = 96  # enough shards (24) that a killed run is still mid-way when the test's SIGKILL lands


def shard_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.arrow"))}


def snapshot(folder: Path) -> dict:
    """Every file but the lock file, which each run rewrites with its PID (locks.py)."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.name != ".popyou.lock"}


def raw_images(folder: Path) -> list[bytes]:
    ds = datasets.load_from_disk(str(folder)).cast_column("image", datasets.Image(decode=False))
    return [im["bytes"] for im in ds["image"]]


def one_line_error(res) -> str:
    return helpers.one_line_error(res, exit_code=None)  # any failure status


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # conftest.py


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    """One uninterrupted single-process run: the reference every other run must equal."""
    out = tmp_path_factory.mktemp("gen") / "ref"
    res = run_cli("gen-data", "--n", N_REF, "--out", out, *COMMON)
    assert res.exit_code == 0, res.output
    assert f"{N_REF} new rows" in res.output
    return out


def test_end_to_end(ref):
    ds = datasets.load_from_disk(str(ref))
    assert len(ds) == N_REF
    assert set(ds.column_names) >= {"index", "prompt", "seed", "image", "attributes"}
    assert ds["index"] == list(range(N_REF))
    scheme = default_scheme()
    for i in (0, 5, N_REF - 1):
        prompt, attributes = make_prompt(scheme, 7, i)
        row = ds[i]
        assert row["prompt"] == prompt and row["seed"] == image_seed(7, i)
        assert {k: v for k, v in row["attributes"].items() if v is not None} == attributes
        assert row["image"].size == (32, 32) and row["image"].mode == "RGB"
    assert all(b.startswith(b"\x89PNG") for b in raw_images(ref)[:4])
    assert len(set(ds["seed"])) == N_REF and len(set(raw_images(ref))) == N_REF  # no repeated images
    settings = read_manifest(ref)["settings"]
    assert {k: settings[k] for k in ("model", "size", "steps", "guidance", "seed", "dtype", "image_format")} == \
        {"model": "tiny", "size": 32, "steps": 1, "guidance": 0.0, "seed": 7, "dtype": "fp32", "image_format": "png"}
    assert "attributes" in settings["prompt_scheme"]
    assert len(load_stage(ref)) == N_REF


def test_remake_one_image_alone(ref):
    ds = datasets.load_from_disk(str(ref))
    stored = raw_images(ref)
    for i in (8, 13, N_REF - 1):
        image, data = remake_image(ref, i, device="cpu")  # its batch only (<= 4 images), not the data set
        assert data == stored[i]
        image, _ = remake_image(ref, i, device="cpu", exact=False)  # truly alone: equal up to rounding
        diff = np.abs(np.asarray(image, dtype=int) - np.asarray(ds[i]["image"], dtype=int))
        assert diff.mean() < 0.05 and diff.max() <= 16


def test_rerun_of_finished_folder_does_nothing(ref):
    before = snapshot(ref)
    res = run_cli("gen-data", "--n", N_REF, "--out", ref, *COMMON)
    assert res.exit_code == 0 and "nothing to do" in res.output, res.output
    assert snapshot(ref) == before


def test_resume_after_sigkill(ref, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "popyou_cli", "gen-data", "--n", str(N_REF), "--out", str(out), *COMMON]
    assert kill_after_first_shard(cmd, out, REPO) == -signal.SIGKILL
    left = shard_files(out)
    assert 1 <= len(left) < N_REF // 4, "the kill should land mid-run"
    assert not (out / "state.json").exists()

    res = run_cli("gen-data", "--n", N_REF, "--out", out, *COMMON)
    assert res.exit_code == 0, res.output
    assert f"{N_REF - 4 * len(left)} new rows" in res.output  # only the missing shards were made
    assert shard_files(out) == shard_files(ref)  # same rows, no gaps, no duplicates, identical bytes
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no temporary files left
    assert datasets.load_from_disk(str(out))["index"] == list(range(N_REF))


def test_larger_n_generates_only_missing_rows(ref, tmp_path):
    out = tmp_path / "grow"
    assert run_cli("gen-data", "--n", 10, "--out", out, *COMMON).exit_code == 0
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-0000[01]-*.arrow")}
    res = run_cli("gen-data", "--n", 18, "--out", out, *COMMON)
    assert res.exit_code == 0 and "8 new rows" in res.output, res.output
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == kept  # full shards untouched
    grown, full = datasets.load_from_disk(str(out)), datasets.load_from_disk(str(ref)).select(range(18))
    assert grown["index"] == list(range(18))
    assert grown["prompt"] == full["prompt"] and grown["seed"] == full["seed"]
    assert raw_images(out) == raw_images(ref)[:18]
    # A smaller n than the folder holds is refused, not truncated.
    assert "more than" in one_line_error(run_cli("gen-data", "--n", 12, "--out", out, *COMMON))


def test_two_processes_equal_one(ref, tmp_path):
    out = tmp_path / "two"
    with socket.socket() as s:  # a free port: other test runs on this machine may use the default one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The CPU form of `accelerate launch --num_processes K -- $(which popyou) gen-data ...` (see README).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "-m", "popyou_cli", "--",
           "gen-data", "--n", "24", "--out", str(out), *COMMON]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "24 new rows (2 processes; this one: 12 in" in proc.stderr, proc.stderr[-3000:]
    files = shard_files(out)
    assert len(files) == 6 and files == {k: v for k, v in shard_files(ref).items() if k in files}
    assert datasets.load_from_disk(str(out))["index"] == list(range(24))


def test_formats_progress_and_long_prompts(tmp_path):
    # A template far beyond CLIP's 77 tokens: truncated by the pipeline, not a crash.
    scheme = tmp_path / "long.json"
    scheme.write_text(json.dumps({"template": "A Funko Pop! figure {attributes}." + " Very detailed." * 60}))
    from rich.console import Console

    buf = io.StringIO()
    res = gen_data(out=tmp_path / "webp", n=5, preset="tiny", size=32, shard_size=4, batch_size=4,
                   image_format="webp", quality=80, prompt_file=scheme, device="cpu",
                   console=Console(file=buf, force_terminal=True, width=120))
    assert res.done == 5 and "images/s" in buf.getvalue() and "ETA" in buf.getvalue()
    ds = datasets.load_from_disk(str(tmp_path / "webp"))
    assert ds[4]["image"].format == "WEBP" and ds[4]["prompt"].endswith("Very detailed.")
    settings = read_manifest(tmp_path / "webp")["settings"]
    assert settings["image_format"] == "webp" and settings["quality"] == 80


def test_bad_input_is_one_line_and_leaves_folder_alone(tmp_path):
    out = tmp_path / "run"
    assert run_cli("gen-data", "--n", 4, "--out", out, *COMMON).exit_code == 0
    before = snapshot(out)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    cases = [
        ({"n": 0}, "--n must be at least 1"),
        ({"n": -3}, "--n must be at least 1"),
        ({"shard_size": 0}, "--shard-size must be at least 1"),
        ({"seed": 8}, "holds a different run"),
        ({"image_size": 64}, "holds a different run"),
        ({"batch_size": 2}, "holds a different run"),
        ({"model": "someone/other-model"}, "holds a different run"),
        ({"format": "gif"}, "unknown --format"),
        ({"quality": 90}, "--quality applies to jpeg and webp only"),
        ({"image_size": 30}, "multiple of 8"),
    ]
    for changes, message in cases:
        res = run_cli("gen-data", "--out", out, *opts(**{"n": 4, **changes}))
        assert message in one_line_error(res), (changes, res.output)
        assert snapshot(out) == before, changes
    assert "cannot write" in one_line_error(run_cli("gen-data", "--n", 4, "--out", a_file / "sub", *COMMON))
    res = run_cli("gen-data", "--n", 4, "--out", tmp_path / "mine", "--overwrite", *COMMON)
    assert "not a popyou" in one_line_error(res)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # --overwrite replaces a different run of gen-data.
    res = run_cli("gen-data", "--n", 4, "--out", out, "--overwrite", *opts(seed=8))
    assert res.exit_code == 0, res.output
    assert read_manifest(out)["settings"]["seed"] == 8


def test_materialize_and_bench(ref, tmp_path):
    res = run_cli("materialize", ref, tmp_path / "copy")
    assert res.exit_code == 0, res.output
    assert datasets.load_from_disk(str(tmp_path / "copy"))["prompt"] == datasets.load_from_disk(str(ref))["prompt"]
    assert "not empty" in one_line_error(run_cli("materialize", ref, tmp_path / "copy"))
    res = run_cli("bench", "gen-data", "--n", 8, "--batch-size", 4, "--image-size", 32, "--repeats", 1,
                  "--out", tmp_path / "bench.json")
    assert res.exit_code == 0, res.output
    modes = [r["mode"] for r in json.loads((tmp_path / "bench.json").read_text())["results"]]
    assert len(modes) == 3 and all(r["images_per_s"] > 0
                                   for r in json.loads((tmp_path / "bench.json").read_text())["results"])


def test_dtype_has_one_spelling_checked_before_any_work(tmp_path):
    # --dtype takes auto|fp32|bf16|fp16 (the aliases float16, half... went before any release); another spelling is
    # refused in one line while the options are parsed, before a folder is made.
    assert "unknown dtype 'float16'" in helpers.one_line_error(
        run_cli("gen-data", "--n", 2, "--out", tmp_path / "half", *opts(dtype="float16")))
    assert not (tmp_path / "half").exists()
    res = run_cli("gen-data", "--n", 2, "--out", tmp_path / "half", *opts(dtype="fp16"))
    assert res.exit_code == 0, res.output
    assert read_manifest(tmp_path / "half")["settings"]["dtype"] == "fp16"
    assert "unknown dtype 'int8'" in helpers.one_line_error(
        run_cli("gen-data", "--n", 2, "--out", tmp_path / "bad", *opts(dtype="int8")))
