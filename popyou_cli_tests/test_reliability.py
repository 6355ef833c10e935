"""Nothing silently wrong (issue 12) and reruns that resume (issue 14.4): stage lineage and `popyou verify`, one
writer per folder (real second processes), resume that honours what it resumes, bounds checked before any work,
one error path, repeatable training, portable folders and uploads. Tiny presets, CPU, offline."""
import errno
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import encoded_stage, invoke, one_line_error
from popyou_cli.core.errors import PopyouError
from popyou_cli.data.caption import caption
from popyou_cli.data.gen_data import gen_data
from popyou_cli.store import load_stage, read_manifest
from popyou_cli.train.loop import read_metrics

REPO = Path(__file__).resolve().parent.parent
PACED = Path(__file__).resolve().parent / "paced_cli.py"  # the CLI with a test's pauses injected
GEN = dict(preset="tiny", size=32, shard_size=4, batch_size=4, device="cpu", progress=False)
CAP = dict(preset="tiny", shard_size=4, batch_size=4, workers=0, device="cpu", progress=False)
FT = ["finetune", "--preset", "tiny", "--sample-every", 0, "--n-samples", 0]
DATA_CMD = ["--preset", "tiny", "--device", "cpu", "--workers", 0, "--no-progress"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # conftest.py


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """run/data (gen-data, 8 rows in 2 shards) and run/cap (caption), as the issue's probe had them."""
    root = tmp_path_factory.mktemp("run")
    gen_data(out=root / "data", n=8, **GEN)
    caption(dataset=root / "data", out=root / "cap", **CAP)
    return root


def shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.arrow"))}


# ------------------------------------------------------------------------------------------ 1. lineage, verify
def test_regenerated_parent_is_refused_by_every_later_stage(run, tmp_path):
    other = tmp_path / "other"
    for name in ("data", "cap"):
        shutil.copytree(run / name, other / name, symlinks=True)
    assert len(load_stage(other / "cap")) == 8  # a copy of both folders is fine: lineage is by content
    gen_data(out=other / "data", n=8, seed=1, overwrite=True, **GEN)  # another data set in the parent's place
    for res in (invoke("encode", "--data", other / "cap", "--out", other / "enc", *DATA_CMD),
                invoke("materialize", other / "cap", other / "mat")):
        line = one_line_error(res)
        assert f"{other / 'cap'} was made from another version of {other / 'data'}" in line and "--overwrite" in line
    assert not (other / "enc" / "state.json").exists() and not (other / "mat").exists()
    cap_cmd = ["caption", "--data", other / "data", "--out", other / "cap", "--shard-size", 4, *DATA_CMD]
    line = one_line_error(invoke(*cap_cmd))
    assert "was made from another version" in line and "--overwrite" in line  # continuing it is refused too
    res = invoke(*cap_cmd, "--overwrite")
    assert res.exit_code == 0, res.output
    assert load_stage(other / "cap")["prompt"] == load_stage(other / "data")["prompt"]


def test_verify_and_rerun_repair_exactly_the_damaged_shard(run, tmp_path):
    work = tmp_path / "w"
    for name in ("data", "cap"):
        shutil.copytree(run / name, work / name, symlinks=True)
    data, original = work / "data", shards(run / "data")
    names = sorted(original)
    rot = bytearray(original[names[1]])
    rot[len(rot) // 2] ^= 0x01  # one bit, in place: same size, same rows
    (data / names[1]).write_bytes(bytes(rot))
    res = invoke("verify", work / "cap")
    assert res.exit_code == 1
    assert f"shard {names[1]} (rows 4..7) damaged, set aside" in res.output
    assert "rerun 'popyou gen-data' with its options on" in " ".join(res.output.split())
    # Set aside, the shard is missing: the next stage says so in one line, and so does a deleted one.
    line = one_line_error(invoke("encode", "--data", work / "cap", "--out", work / "enc", *DATA_CMD))
    assert "rows 4..7" in line and "is missing" in line and "rerun 'popyou gen-data'" in line
    kept = (data / names[0]).stat().st_mtime_ns
    assert gen_data(out=data, n=8, **GEN).done == 4  # exactly the damaged shard is made again
    assert shards(data) == original and (data / names[0]).stat().st_mtime_ns == kept
    res = invoke("verify", work / "cap")
    assert res.exit_code == 0 and "every shard as written" in res.output, res.output
    (data / names[0]).write_bytes(original[names[1]])  # a shard copied over another: the rerun alone repairs it
    assert gen_data(out=data, n=8, **GEN).done == 4 and shards(data) == original
    (data / names[0]).unlink()
    line = one_line_error(invoke("materialize", work / "cap", work / "flat"))
    assert "rows 0..3" in line and "is missing" in line


# ------------------------------------------------------------------------------------------ 2. one writer
def _wait_for_lock(folder: Path, pid: int, proc) -> dict:
    deadline = time.monotonic() + 180
    while True:
        try:
            info = json.loads((folder / ".popyou.lock").read_text() or "{}")
            if info.get("pid") == pid:
                return info
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the first writer never locked the folder"
        time.sleep(0.05)


def test_two_writers_race_on_one_folder_and_a_kill_leaves_no_stale_lock(run, tmp_path):
    out = tmp_path / "cap"
    args = ["caption", "--data", str(run / "data"), "--out", str(out), "--shard-size", "2", "--batch-size", "1",
            *map(str, DATA_CMD)]
    # 8 batches, 3 s after each (paced_cli.py): the first writer lives ~25 s
    first = subprocess.Popen([sys.executable, str(PACED), "--batch-pause", "3", "--", *args], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_lock(out, first.pid, first)
        second = subprocess.run([sys.executable, "-m", "popyou_cli", *args], cwd=REPO, capture_output=True,
                                text=True, timeout=180)
        assert first.poll() is None, "the race needs the first writer still running"
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert second.returncode == 1 and len(lines) == 1, second.stderr
        assert f"is in use by PID {first.pid} on {socket.gethostname()}" in lines[0]
        first.kill()  # SIGKILL: the kernel drops the lock with the process
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.stderr.close()
    res = invoke("caption", "--data", run / "data", "--out", out, "--shard-size", 2, "--batch-size", 1, *DATA_CMD)
    assert res.exit_code == 0, res.output
    assert load_stage(out)["index"] == list(range(8))


def test_a_training_run_refuses_a_folder_another_process_holds(tmp_path):
    from popyou_cli.core.locks import FolderLock

    out = tmp_path / "ft"
    out.mkdir()
    cmd = [sys.executable, "-m", "popyou_cli", *map(str, FT), "--data", str(encoded_stage()), "--max-steps", "2",
           "--out", str(out)]
    with FolderLock(out, "run folder"):  # this test process is the other writer
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert f"run folder {out} is in use by PID {os.getpid()} on {socket.gethostname()}" in lines[0]
    assert not (out / "checkpoints").exists()
    assert invoke(*FT, "--data", encoded_stage(), "--max-steps", 2, "--out", out).exit_code == 0


# ------------------------------------------------------------------------------------------ 3. resume
def test_resume_checks_the_run_and_with_changes_uses_and_records_the_new_settings(tmp_path):
    from popyou_cli.core.presets import FINETUNE_PRESETS
    from popyou_cli.train.loop import lr_factor

    data = encoded_stage()
    base = [*FT, "--data", data, "--max-steps", 8, "--save-every", 4, "--keep-last", 5]
    assert invoke(*base, "--out", tmp_path / "a").exit_code == 0
    step4 = tmp_path / "a" / "checkpoints" / "step-4"
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:  # killed mid-line after step 8's checkpoint went
        f.write('{"step": 9, "lo')
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step-8")
    assert invoke(*base, "--out", tmp_path / "a").exit_code == 0  # the same command: continues from step 4
    assert [m["step"] for m in read_metrics(tmp_path / "a")] == list(range(1, 9))
    line = one_line_error(invoke(*base, "--lr", 0.05, "--resume", step4, "--out", tmp_path / "b"))
    assert f"cannot resume from {step4}" in line and "lr 0.05 (checkpoint: 0.003)" in line
    other_data = encoded_stage(n=96)
    line = one_line_error(invoke(*base, "--resume", step4, "--out", tmp_path / "c", "--data", other_data))
    assert "data sha256:" in line and "rows 96 (checkpoint: 192)" in line
    res = invoke(*base, "--lr", 0.05, "--resume", step4, "--resume-with-changes", "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output
    cfg = FINETUNE_PRESETS["tiny"]
    lrs = {m["step"]: m["lr"] for m in read_metrics(tmp_path / "b")}
    assert sorted(lrs) == [5, 6, 7, 8]
    # metrics.jsonl logs the rate after each step: the new peak rate on the run's schedule, not the checkpoint's
    assert all(lrs[s] == pytest.approx(0.05 * lr_factor(s, 8, cfg)) for s in lrs)
    recorded = json.loads((tmp_path / "b" / "model" / "config.json").read_text())["finetune"]
    assert recorded["settings"]["lr"] == 0.05 and recorded["history"] == [{"step": 4, "changed": {"lr": [0.003, 0.05]}}]
    assert (tmp_path / "b" / "model" / recorded["resumed_from"]).resolve() == step4.resolve()
    line = one_line_error(invoke(*base, "--resume", "never", "--out", tmp_path / "a"))
    assert "already holds checkpoints" in line and "--overwrite" in line


def test_every_training_option_either_defines_the_run_or_may_change_on_resume():
    from dataclasses import fields

    from popyou_cli.core.presets import TrainPreset
    from popyou_cli.train.resume import DEFINING_FIELDS, RUN_OPTIONS

    names = [f.name for f in fields(TrainPreset)]
    assert sorted(DEFINING_FIELDS + RUN_OPTIONS) == sorted(names)  # a new option must be put in one of them


def test_quickstart_training_steps_rerun_without_flags(tmp_path):
    """examples/quickstart.sh's training lines, run as written, then again after a 'kill' took the last
    checkpoints and results, then once more: every rerun succeeds with no flag and continues the run."""
    work = tmp_path / "qs"
    shutil.copytree(encoded_stage(), work / "enc")
    lines = [ln.strip() for ln in (REPO / "examples" / "quickstart.sh").read_text().splitlines()
             if ln.strip().startswith("$POPYOU ") and (" finetune " in ln or " train-adapter " in ln)]
    assert len(lines) == 3
    commands = [shlex.split(ln.replace("$POPYOU ", "").replace("$W", str(work))) for ln in lines]

    def run_all():
        for args in commands:
            res = invoke(*args)
            assert res.exit_code == 0, (args, res.output)

    run_all()
    curves = {r: read_metrics(work / r) for r in ("ft", "img", "txt")}
    for r in ("ft", "img", "txt"):  # killed after the mid-run checkpoint: the last one and the result are gone
        last = sorted((work / r / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))[-1]
        shutil.rmtree(last)
        shutil.rmtree(work / r / ("model" if r == "ft" else "pipeline"))
    run_all()
    for r, curve in curves.items():
        assert [m["loss"] for m in read_metrics(work / r)] == pytest.approx([m["loss"] for m in curve], abs=1e-6)
    run_all()  # nothing left to do: still exit 0


def test_a_data_stage_that_wrote_nothing_does_not_block_the_corrected_command(tmp_path):
    out = tmp_path / "data"
    with pytest.raises(PopyouError):
        gen_data(out=out, n=4, model=str(tmp_path / "no-such-model"), **GEN)
    assert read_manifest(out) is not None  # it got as far as its manifest
    assert gen_data(out=out, n=4, **GEN).done == 4  # the corrected command: no --overwrite needed


# ------------------------------------------------------------------------------------------ 4. bounds
@pytest.mark.parametrize("args,message", [
    (["gen-data", "--n", 10**12, "--preset", "tiny"], "--n must be in 1..1_000_000_000 (got 1_000_000_000_000)"),
    (["gen-data", "--n", 8, "--preset", "tiny", "--seed", 2**70], "--seed must be in [0, 2^63)"),
    (["gen-data", "--n", 8, "--preset", "tiny", "--guidance", "nan"], "--guidance must be a finite number"),
    (["gen-data", "--n", 8, "--preset", "tiny", "--batch-size", 10**6], "--batch-size must be in 1..65_536"),
    (["gen-data", "--n", 10**9, "--preset", "tiny", "--shard-size", 1], "more than 1000000; raise --shard-size"),
    ([*FT, "--lr", "nan"], "--lr must be a finite number"),
    ([*FT, "--lr", "inf"], "--lr must be a finite number"),
    ([*FT, "--seed", 2**70], "--seed must be in [0, 2^63)"),
    ([*FT, "--batch-size", 0], "--batch-size must be in 1..65_536"),
    (["sample", "a wizard", "--pipeline", "nowhere", "--seed", 1180591620717411303424], "--seed must be in [0, 2^63)"),
    (["sample", "a wizard", "--pipeline", "nowhere", "--beta", "nan"], "--beta must be a finite number"),
    (["sample", "a wizard", "--pipeline", "nowhere", "--beta-sweep", "0:1:100000"], "2 to 600 frames"),
])
def test_out_of_range_inputs_are_refused_before_any_work(tmp_path, args, message):
    out = tmp_path / "out"
    if args[0] == "finetune":
        args = [*args, "--data", encoded_stage()]
    line = one_line_error(invoke(*args, "--out", out))
    assert message in line, line
    assert not out.exists() or not [p for p in out.rglob("*") if not p.name.startswith(".")], list(out.rglob("*"))


def test_gen_data_estimates_disk_need_up_front(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 10**6, 10**6))  # 1 MB free
    line = one_line_error(invoke("gen-data", "--n", 1000, "--preset", "tiny", "--out", tmp_path / "d"))
    assert "the 1000 rows still to make need up to" in line and "GiB free" in line
    assert not list((tmp_path / "d").glob("shard-*"))


# ------------------------------------------------------------------------------------------ 5. one error path
def test_disk_full_is_one_line_and_leaves_no_half_written_file(run, tmp_path, monkeypatch):
    import popyou_cli.core.files as files
    import popyou_cli.train.resume as resume

    real_fsync = os.fsync

    def full_at_shards(fd):  # every commit fsyncs before its rename; shard files find the disk full
        if ".shard-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", full_at_shards)
    out = tmp_path / "cap"
    line = one_line_error(invoke("caption", "--data", run / "data", "--out", out, *DATA_CMD))
    assert "no space left on the device" in line and "rerun the same command" in line
    assert not list(out.glob("shard-*")) and not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    monkeypatch.undo()

    real = resume.atomic_write

    def full_at_optimizer(path, content):
        if Path(path).name == "optimizer.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, content)

    monkeypatch.setattr(resume, "atomic_write", full_at_optimizer)
    ft = tmp_path / "ft"
    line = one_line_error(invoke(*FT, "--data", encoded_stage(), "--max-steps", 2, "--out", ft))
    assert "no space left on the device" in line
    assert list((ft / "checkpoints").iterdir()) == []  # no step-2.tmp left behind


def test_corrupt_files_and_unexpected_errors_are_one_line(tmp_path, monkeypatch):
    data = encoded_stage()
    assert invoke(*FT, "--data", data, "--max-steps", 2, "--out", tmp_path / "ft").exit_code == 0
    ckpt = tmp_path / "ft" / "checkpoints" / "step-2"
    torch.save({"state": {}, "param_groups": [], "evil": print}, ckpt / "optimizer.pt")  # a pickle of a function
    line = one_line_error(invoke(*FT, "--data", data, "--max-steps", 4, "--resume", ckpt, "--resume-with-changes",
                                 "--out", tmp_path / "ft2"))
    assert "Python objects beyond tensors" in line and "weights_only=False" not in line
    weights = ckpt / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    line = one_line_error(invoke(*FT, "--data", data, "--max-steps", 4, "--resume", ckpt, "--resume-with-changes",
                                 "--out", tmp_path / "ft2"))
    assert "trainable.safetensors is unreadable" in line and f"delete {ckpt}" in line
    import popyou_cli.store as store

    monkeypatch.setattr(store, "materialize", lambda *a, **k: 1 / 0)
    line = one_line_error(invoke("materialize", data, tmp_path / "m"))
    assert "unexpected error: ZeroDivisionError" in line and "--debug" in line
    res = invoke("--debug", "materialize", data, tmp_path / "m")
    assert res.exit_code == 1 and "Traceback" in res.output and "ZeroDivisionError" in res.output


# ------------------------------------------------------------------------------------------ 6. repeatable
@pytest.mark.parametrize("stage", ["finetune", "train-adapter"])
def test_the_same_command_gives_the_same_loss_curve(tmp_path, stage):
    data = encoded_stage()
    if stage == "finetune":
        args = [*FT, "--data", data, "--max-steps", 6]
    else:
        assert invoke(*FT, "--data", data, "--max-steps", 2, "--out", tmp_path / "ft").exit_code == 0
        args = ["train-adapter", "--preset", "tiny", "--var", tmp_path / "ft" / "model", "--data", data,
                "--max-steps", 6, "--n-samples", 0, "--lora"]
    curves = []
    for k in range(2):
        res = invoke(*args, "--out", tmp_path / f"run{k}")
        assert res.exit_code == 0, res.output
        curves.append([m["loss"] for m in read_metrics(tmp_path / f"run{k}")])
    assert len(curves[0]) == 6 and curves[0] == curves[1]  # exactly, not approximately


# ------------------------------------------------------------------------------------------ 7. portable
def test_no_local_path_in_written_folders_or_what_push_to_hub_uploads(run, tmp_path, monkeypatch):
    import huggingface_hub

    uploaded = []

    def upload_folder(**kw):  # what would be uploaded: a copy of the folder at that moment
        dest = tmp_path / "uploaded" / str(len(uploaded))
        shutil.copytree(kw["folder_path"], dest)
        uploaded.append(dest)
        return "https://huggingface.co/me/x/commit/0"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    data = encoded_stage()
    absolute = str(tmp_path.resolve())
    assert invoke(*FT, "--data", data, "--max-steps", 2, "--out", tmp_path / "ft").exit_code == 0
    res = invoke("train-adapter", "--preset", "tiny", "--var", tmp_path / "ft" / "model", "--data", data,
                 "--max-steps", 2, "--n-samples", 0, "--out", tmp_path / "img", "--push-to-hub", "me/x")
    assert res.exit_code == 0, res.output
    res = invoke("sample", "a wizard funko pop", "--pipeline", tmp_path / "img" / "pipeline", "--n", 1,
                 "--out", tmp_path / "samples", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert uploaded
    written = [*uploaded, tmp_path / "ft" / "model", tmp_path / "img" / "pipeline", tmp_path / "samples",
               run / "data", run / "cap", data]
    leaks = []
    for folder in written:
        for f in folder.rglob("*"):
            if f.is_file() and f.suffix in (".json", ".jsonl", ".md", ".txt", ".yaml"):
                text = f.read_text(errors="replace")
                if absolute in text or str(REPO) in text or str(data.parent) in text:
                    leaks.append(str(f))
    assert not leaks, leaks
    for folder in (run / "data", run / "cap"):
        assert "parent_abs" not in read_manifest(folder)
