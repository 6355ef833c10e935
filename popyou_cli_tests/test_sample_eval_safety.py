"""What an adversarial probe broke in `sample` and `eval`, kept fixed: --out is locked like every command's, a folder
popyou did not write is not written into without --overwrite, a killed run's temporaries go with the next run;
eval --images reads only the folder's own files, and an enormous image is one line; the Python API holds alpha
and beta to the CLI's bounds; a bad pipeline.json default is named as pipeline.json names it; warnings are one
line. (The demo's upload limit is in test_demo.py.) Tiny, CPU, offline."""
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import invoke, one_line_error

REPO = Path(__file__).resolve().parent.parent
CLASS = ["sample", "--var", "tiny", "--vae", "tiny", "--class-id", 1, "--n", 1, "--device", "cpu"]
HOLD = """
import sys
from popyou_cli.core.locks import FolderLock
lock = FolderLock(sys.argv[1], "--out", "popyou sample")
print("held", flush=True)
sys.stdin.read()
"""


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def png_claiming(path: Path, side: int) -> Path:
    """A 1-bit PNG of side x side pixels (all black): tiny on disk, enormous once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def sample_folder(folder: Path, paths: list[str]) -> Path:
    """A folder like `popyou sample` writes: two 16 px PNGs and a samples.jsonl naming `paths`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(folder / name)
    (folder / "samples.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "path": p, "seed": i}) + "\n"
                                                  for i, p in enumerate(paths)))
    return folder


# ------------------------------------------------------------------------------------------ eval --images reads
@pytest.mark.parametrize("case", ["absolute", "up", "link out"])
def test_eval_images_reads_only_files_inside_the_folder(tmp_path, case):
    outside = tmp_path / "secret.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(outside)
    folder = tmp_path / "s"
    name = {"absolute": str(outside), "up": "../secret.png", "link out": "link.png"}[case]
    sample_folder(folder, ["a.png", name])
    if case == "link out":
        (folder / "link.png").symlink_to(outside)
    line = one_line_error(invoke("eval", "--images", folder, "--out", tmp_path / "report"))
    assert f"names '{name}', which is not a file inside the folder" in line, line
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("side", [10_000, 40_000])  # over PIL's warning limit; over its error limit
def test_an_enormous_image_is_one_line(tmp_path, side):
    folder = sample_folder(tmp_path / "s", ["a.png", "b.png"])
    png_claiming(folder / "b.png", side)
    res = invoke("eval", "--images", folder, "--out", tmp_path / "report")
    line = one_line_error(res)
    assert "too large to decode safely" in line and str(folder / "b.png") in line, line
    assert "unexpected" not in line and "Warning" not in res.output


def test_an_enormous_image_in_a_reference_folder_stays_out_of_it(tmp_path):
    from popyou_cli.eval.fid_reference import folder_reference

    ref = tmp_path / "ref"
    sample_folder(ref, [])
    png_claiming(ref / "huge.png", 40_000)
    assert folder_reference(ref, 16, 10).load().shape == (2, 16, 16, 3)


def test_a_bomb_anywhere_else_is_one_line_not_unexpected():
    from PIL import Image as PILImage

    from popyou_cli.core.failures import describe

    line = describe(PILImage.DecompressionBombError("Image size (1600000000 pixels) exceeds limit"))
    assert line.startswith("an image is too large to decode safely") and "unexpected" not in line


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


# ------------------------------------------------------------------------------------------ the output folder
def test_a_second_sample_into_a_locked_out_is_refused_in_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_line_error(invoke(*CLASS, "--out", out))
        assert f"--out {out} is in use by PID {holder.pid}" in line and "(popyou sample)" in line
        assert [p.name for p in out.iterdir()] == [".popyou.lock"]  # nothing written meanwhile
    finally:
        holder.communicate("", timeout=60)
    res = invoke(*CLASS, "--out", out)  # the holder is gone: the folder is free again
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [".popyou.lock", "class1_grid.png", "class1_seed0.png"]


def test_sample_refuses_a_folder_it_did_not_write_unless_overwrite(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "class1_grid.png").write_bytes(b"my own picture")
    (out / "notes.txt").write_text("mine")
    line = one_line_error(invoke(*CLASS, "--out", out))
    assert f"--out {out} is not empty and popyou did not write it" in line and "--overwrite" in line
    assert (out / "class1_grid.png").read_bytes() == b"my own picture" and not (out / "class1_seed0.png").exists()
    res = invoke(*CLASS, "--out", out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert (out / "class1_grid.png").read_bytes() != b"my own picture" and (out / "class1_seed0.png").is_file()
    assert (out / "notes.txt").read_text() == "mine"  # only the files sample writes are replaced
    fresh = tmp_path / "again"
    assert invoke(*CLASS, "--out", fresh).exit_code == 0
    assert invoke(*CLASS, "--seed", 5, "--out", fresh).exit_code == 0  # a folder it wrote: no flag needed


def test_text_sample_and_eval_refuse_a_folder_they_did_not_write(work, tmp_path):
    pipe = work / "txt" / "pipeline"
    for command, args, mine in (("sample", ["a wizard funko pop", "--pipeline", pipe, "--n", 2], "grid.png"),
                                ("eval", ["--images", work / "samples"], "report.md")):
        out = tmp_path / command
        out.mkdir()
        (out / mine).write_text("my own file")
        line = one_line_error(invoke(command, *args, "--out", out))
        assert "is not empty and popyou did not write it" in line and "--overwrite" in line, line
        assert (out / mine).read_text() == "my own file" and sorted(p.name for p in out.iterdir()) == [mine]
        res = invoke(command, *args, "--out", out, "--overwrite")
        assert res.exit_code == 0, res.output
        assert (out / mine).read_bytes() != b"my own file"
        assert invoke(command, *args, "--out", out).exit_code == 0  # now it holds popyou's record


def test_the_next_run_removes_what_a_killed_sample_or_eval_left(work, tmp_path):
    gone = dead_pid()
    samples, report = tmp_path / "samples", tmp_path / "report"
    assert invoke("sample", "a wizard funko pop", "--pipeline", work / "txt" / "pipeline", "--n", 2,
                  "--out", samples).exit_code == 0
    assert invoke("eval", "--images", samples, "--out", report).exit_code == 0
    planted = [samples / f".grid.png.{gone}.0123abcd.tmp", samples / f".samples.jsonl.{gone}.0123abcd.tmp",
               report / f".metrics.json.{gone}.0123abcd.tmp", report / "images" / f".0000.png.{gone}.0123abcd.tmp"]
    for p in planted:
        p.write_text("left by a kill")
    assert invoke("sample", "a wizard funko pop", "--pipeline", work / "txt" / "pipeline", "--n", 2,
                  "--out", samples).exit_code == 0
    assert invoke("eval", "--images", samples, "--out", report).exit_code == 0
    assert [p.name for p in planted if p.exists()] == []
