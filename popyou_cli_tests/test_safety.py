"""What an adversarial probe broke, kept fixed: popyou writes only inside folders it owns and never through a link;
--overwrite deletes only what popyou made, and a killed one is finished by the rerun; a folder's lock dies with
its run, DataLoader workers included; a full disk is one line naming it; written folders honour the umask and
the lock records no path.
Real symlinks, hard links, SIGKILLs and a real small tmpfs where the machine allows one. Tiny, CPU, offline.
The bounds of every typed number are in test_bounds.py, hostile files in test_hostile_files.py."""
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import encoded_stage, invoke, one_line_error
from popyou_cli.core.errors import PopyouError
from popyou_cli.store import check_can_replace, load_stage, read_manifest

HERE = Path(__file__).resolve().parent
REPO, PACED = HERE.parent, HERE / "paced_cli.py"
GEN = ["--preset", "tiny", "--image-size", 32, "--shard-size", 2, "--batch-size", 2, "--device", "cpu",
       "--no-progress"]
DATA = ["--preset", "tiny", "--shard-size", 2, "--batch-size", 1, "--device", "cpu", "--no-progress"]
FT = ["finetune", "--preset", "tiny", "--sample-every", 0, "--n-samples", 0, "--max-steps", 2]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # conftest.py


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """run/data (gen-data, 8 rows in 4 shards) and run/cap (caption of it)."""
    root = tmp_path_factory.mktemp("run")
    assert invoke("gen-data", "--n", 8, "--out", root / "data", *GEN).exit_code == 0
    res = invoke("caption", "--data", root / "data", "--out", root / "cap", "--workers", 0, *DATA)
    assert res.exit_code == 0, res.output
    return root


def shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.arrow"))}


def copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


def victim_file(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    return victim


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------ 1. never through a link
def test_a_linked_lock_file_is_refused_and_what_it_points_to_never_written(run, tmp_path):
    data, victim = copy(run / "data", tmp_path / "w" / "data"), victim_file(tmp_path)
    lock = data / ".popyou.lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(os.path.relpath(victim, data))  # ln -s ../../victim.txt .popyou.lock
    before = shards(data)
    for extra in ([], ["--overwrite"]):
        line = one_line_error(invoke("gen-data", "--n", 8, "--out", data, *GEN, *extra))
        assert "is a symbolic link" in line and str(lock) in line
    assert victim.read_text() == "precious\n" and lock.is_symlink() and shards(data) == before
    lock.unlink()
    os.link(victim, lock)  # a hard link: the same file under a second name
    line = one_line_error(invoke("gen-data", "--n", 8, "--out", data, *GEN))
    assert "hard link" in line and victim.read_text() == "precious\n"


def test_verify_sets_aside_without_writing_through_links(run, tmp_path):
    data, victim = copy(run / "data", tmp_path / "w" / "data"), victim_file(tmp_path)
    names = sorted(shards(data))
    for name in names[:2]:
        raw = bytearray((data / name).read_bytes())
        raw[len(raw) // 2] ^= 1
        (data / name).write_bytes(bytes(raw))
    aside = data / f".{names[0]}.damaged"
    aside.symlink_to(victim)  # planted where the damaged shard goes
    lock = data / ".popyou.lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(victim)
    res = invoke("verify", data)
    assert res.exit_code == 1 and "damaged shards not set aside" in res.output and "symbolic link" in res.output
    assert victim.read_text() == "precious\n" and (data / names[0]).is_file()
    lock.unlink()
    res = invoke("verify", data)
    assert res.exit_code == 1 and f"shard {names[0]} (rows 0..1) damaged, set aside" in res.output, res.output
    assert victim.read_text() == "precious\n"
    assert not aside.is_symlink() and aside.is_file() and not (data / names[0]).exists()  # the link replaced
    assert invoke("gen-data", "--n", 8, "--out", data, *GEN).exit_code == 0
    assert shards(data) == shards(run / "data") and victim.read_text() == "precious\n"


def test_committed_files_replace_a_link_and_never_reuse_a_planted_temporary_name(tmp_path, monkeypatch):
    import uuid

    import popyou_cli.core.files as files

    victim = victim_file(tmp_path)
    target = tmp_path / "record.json"
    target.symlink_to(victim)
    files.atomic_write_json(target, {"new": 1})
    assert victim.read_text() == "precious\n" and not target.is_symlink() and json.loads(target.read_text())
    monkeypatch.setattr(files.uuid, "uuid4", lambda: uuid.UUID(int=0))  # the temporary name made predictable
    planted = files.temporary_name(tmp_path / "other.json")
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        files.atomic_write(tmp_path / "other.json", "x")
    assert victim.read_text() == "precious\n" and not (tmp_path / "other.json").exists()


# ------------------------------------------------------------------------------------------ 2. what --overwrite deletes
@pytest.mark.parametrize("stage", ["gen-data", "caption", "encode"])
def test_overwrite_never_replaces_a_home_folder_or_an_input(run, tmp_path, monkeypatch, stage):
    home = copy(run / "data", tmp_path / "home")  # even a home folder that looks like popyou's
    (home / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    inp = {"gen-data": None, "caption": run / "data", "encode": run / "cap"}[stage]
    args = [stage, "--n", 8, *GEN] if inp is None else [stage, "--data", inp, "--workers", 0, *DATA]
    line = one_line_error(invoke(*args, "--out", home, "--overwrite"))
    assert f"refusing to replace output folder {home}: it is your home folder" in line
    assert (home / "notes.txt").read_text() == "mine" and shards(home) == shards(run / "data")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".popyou.lock"}
    for out in ([] if inp is None else [inp, run / "data", run]):  # the input, its parent, the folder of both
        line = one_line_error(invoke(*args, "--out", out, "--overwrite"))
        assert "overlaps input folder" in line
    assert {p: p.read_bytes() for p in before} == before


def test_check_can_replace_is_one_rule_other_commands_can_call(tmp_path, monkeypatch):
    check_can_replace(tmp_path / "new", [])  # missing or empty: nothing to lose
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.jpg").write_bytes(b"x")
    with pytest.raises(PopyouError, match="popyou did not make it"):
        check_can_replace(mine, [], made_by=("pipeline.json",))
    (mine / "pipeline.json").symlink_to(tmp_path / "elsewhere.json")  # a link is no record popyou wrote
    with pytest.raises(PopyouError, match="popyou did not make it"):
        check_can_replace(mine, [], made_by=("pipeline.json",))
    (mine / "pipeline.json").unlink()
    (mine / "pipeline.json").write_text("{}")
    check_can_replace(mine, [], made_by=("pipeline.json",))
    with pytest.raises(PopyouError, match="overlaps input folder"):
        check_can_replace(mine, [mine / "sub"], made_by=("pipeline.json",))
    with pytest.raises(PopyouError, match="the root folder"):
        check_can_replace("/", [])
    monkeypatch.chdir(mine)
    with pytest.raises(PopyouError, match="holding the current folder"):
        check_can_replace(tmp_path, [])


def test_training_overwrite_deletes_only_its_checkpoints(tmp_path):
    out = tmp_path / "ft"
    assert invoke(*FT, "--data", encoded_stage(), "--out", out).exit_code == 0
    (out / "checkpoints" / "notes.txt").write_text("mine")
    assert invoke(*FT, "--data", encoded_stage(), "--out", out, "--overwrite").exit_code == 0
    assert (out / "checkpoints" / "notes.txt").read_text() == "mine" and (out / "checkpoints" / "step-2").is_dir()


# ------------------------------------------------------------------------------------------ 3. resumable destruction
def test_a_killed_overwrite_is_finished_by_the_rerun_and_verify_says_so(tmp_path):
    out, ready = tmp_path / "data", tmp_path / "ready"
    opts = ["--n", 12, "--out", out, *GEN, "--shard-size", 1]
    assert invoke("gen-data", *opts).exit_code == 0  # 12 shards, 12 sidecars, 3 records
    cmd = [sys.executable, str(PACED), "--hold-wipe-after", "10", "--ready", str(ready), "--", "gen-data",
           *map(str, opts), "--seed", "1", "--overwrite"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the wipe never started"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # 10 of the old entries deleted, the others still there
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    left = [p for p in out.iterdir() if p.name not in (".popyou.lock", ".popyou-replacing")]
    assert len(left) == 27 - 10 and (out / ".popyou-replacing").is_file()  # half wiped, and marked so
    res = invoke("verify", out)
    assert res.exit_code == 1 and "every shard as written" not in res.output and "interrupted" in res.output
    line = one_line_error(invoke("caption", "--data", out, "--out", tmp_path / "cap", "--workers", 0, *DATA))
    assert "interrupted" in line
    res = invoke("gen-data", *opts, "--seed", 1, "--overwrite")  # the same command again
    assert res.exit_code == 0, res.output
    fresh = invoke("gen-data", "--n", 12, "--out", tmp_path / "fresh", *GEN, "--shard-size", 1, "--seed", 1)
    assert fresh.exit_code == 0, fresh.output
    assert shards(out) == shards(tmp_path / "fresh") and not (out / ".popyou-replacing").exists()
    assert invoke("verify", out).exit_code == 0


def test_the_next_run_removes_what_a_killed_one_left(run, tmp_path):
    data, gone = copy(run / "data", tmp_path / "data"), dead_pid()
    first = sorted(shards(data))[0]
    planted = [data / f".{first}.{gone}.tmp", data / f".popyou_stage.json.{gone}.0123abcd.tmp",
               data / ".shard-00009-000000018-000000020.arrow.sha256"]  # the sidecar of a shard never renamed
    for p in planted:
        p.write_text("left by a kill")
    assert invoke("gen-data", "--n", 8, "--out", data, *GEN).exit_code == 0
    assert not [p for p in planted if p.exists()] and (data / f".{first}.sha256").is_file()
    dead_copy, live_copy = tmp_path / f".flat.{gone}.0123abcd.tmp", tmp_path / f".flat.{os.getppid()}.0123abcd.tmp"
    for p in (dead_copy, live_copy):
        p.mkdir()
        (p / "state.json").write_text("{}")
    assert invoke("materialize", data, tmp_path / "flat").exit_code == 0
    assert not dead_copy.exists() and live_copy.exists()  # a copy whose process still runs is left alone
    out = tmp_path / "ft"
    (out / "checkpoints" / "step-1.tmp").mkdir(parents=True)
    (out / f".metrics.jsonl.{gone}.0123abcd.tmp").write_text("left by a kill")
    assert invoke(*FT, "--data", encoded_stage(), "--out", out).exit_code == 0
    assert [p.name for p in out.rglob("*.tmp")] == []


# ------------------------------------------------------------------------------------------ 4. locks die with the run
REAPER = r"""
import ctypes, json, os, signal, subprocess, sys, time
from pathlib import Path

ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: the run's orphaned workers become ours
out, log = Path(sys.argv[1]), open(sys.argv[2], "wb")
run = subprocess.Popen(sys.argv[3:], stdout=subprocess.DEVNULL, stderr=log)
deadline = time.monotonic() + 300
while not list(out.glob("shard-*.arrow")):
    assert run.poll() is None and time.monotonic() < deadline, "no shard written"
    time.sleep(0.01)
workers = [int(pid) for task in Path(f"/proc/{run.pid}/task").iterdir()
           for pid in (task / "children").read_text().split()]
os.kill(run.pid, signal.SIGKILL)
run.wait()
from popyou_cli.core.locks import FolderLock
try:
    FolderLock(out).release()
    holder = None
except Exception as e:
    holder = str(e)
ends = [os.waitpid(pid, 0)[1] for pid in workers]
print(json.dumps({"workers": len(workers), "holder": holder,
                  "killed": [os.WIFSIGNALED(s) and os.WTERMSIG(s) == signal.SIGKILL for s in ends]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_CHILD_SUBREAPER is Linux's")
def test_a_killed_caption_leaves_no_lock_and_no_orphan_behind(run, tmp_path):
    out, log = tmp_path / "cap", tmp_path / "stderr.txt"
    args = ["caption", "--data", str(run / "data"), "--out", str(out), "--workers", "2", *map(str, DATA)]
    proc = subprocess.run([sys.executable, "-c", REAPER, str(out), str(log), sys.executable, str(PACED),
                           "--batch-pause", "0.5", "--", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.splitlines()[-1])
    assert seen["workers"] >= 2  # killed mid-run, with its DataLoader workers alive
    assert seen["holder"] is None, seen["holder"]  # the folder was free the moment the main process died
    assert all(seen["killed"]), seen  # the workers died with it (no orphan finishing its batch)
    assert "ConnectionResetError" not in log.read_text() and "Traceback" not in log.read_text()
    res = invoke(*args)  # the immediate rerun
    assert res.exit_code == 0, res.output
    assert load_stage(out)["caption"] == load_stage(run / "cap")["caption"]


# ------------------------------------------------------------------------------------------ 5. a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs (skipped where mounting is not permitted)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()[:100]})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_naming_the_disk(small_disk):
    out = small_disk / "ft"  # the tiny run's checkpoint (2 MB, its optimizer state 1.3 MB) does not fit
    line = one_line_error(invoke(*FT, "--data", encoded_stage(), "--out", out))
    assert f"no space left on the device at {small_disk}" in line and "free" in line and "needs about" in line
    assert "unexpected" not in line and "enforce fail" not in line
    assert list((out / "checkpoints").iterdir()) == []  # no half-written step-2.tmp left


def test_disk_full_error_reads_every_library_wording(tmp_path):
    from popyou_cli.core.files import disk_full_error

    for err in (OSError(errno.ENOSPC, "No space left on device"),
                RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                             'space left on device" })')):
        message = str(disk_full_error(err, tmp_path / "model.safetensors", need=3 << 20))
        assert message.startswith("no space left on the device at /") and "needs about 3.0 MiB" in message
        assert str(tmp_path / "model.safetensors") in message and "\n" not in message
    assert disk_full_error(OSError(errno.EACCES, "Permission denied"), tmp_path) is None


# ------------------------------------------------------------------------------------------ 8. modes, the lock's record
def test_written_folders_follow_the_umask_and_the_lock_records_no_path(tmp_path):
    old = os.umask(0o027)
    try:
        assert invoke("gen-data", "--n", 4, "--out", tmp_path / "data", *GEN).exit_code == 0
        assert invoke(*FT, "--data", encoded_stage(), "--out", tmp_path / "ft").exit_code == 0
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for folder in (tmp_path / "data", tmp_path / "ft")
             for p in [folder, *folder.rglob("*")]}
    assert any(p.suffix == ".safetensors" for p in modes) and any(p.suffix == ".arrow" for p in modes)
    wrong = {str(p): oct(m) for p, m in modes.items() if m != (0o750 if p.is_dir() else 0o640)}
    assert not wrong, wrong
    for folder, command in ((tmp_path / "data", "popyou gen-data"), (tmp_path / "ft", "popyou finetune")):
        record = json.loads((folder / ".popyou.lock").read_text())
        assert record["command"] == command and "/" not in json.dumps(record)
    assert read_manifest(tmp_path / "data")["n_rows"] == 4
