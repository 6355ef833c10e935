"""Hostile files are one line, never a hang or a grind: a manifest with impossible counts or wrong types (checked
against its schema before it sizes anything), `verify` on a folder that is not popyou's, a named pipe, a missing or
an unreadable file in an image-path column (a row error saying which). Real FIFOs; the unreadable file is read as
another user where the tests run as root. Tiny, CPU, offline."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import invoke, one_line_error
from popyou_cli.store import load_stage

REPO = Path(__file__).resolve().parent.parent
GEN = ["--preset", "tiny", "--image-size", 32, "--shard-size", 2, "--batch-size", 2, "--device", "cpu",
       "--no-progress"]
DATA = ["--preset", "tiny", "--shard-size", 2, "--batch-size", 1, "--device", "cpu", "--no-progress"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A gen-data folder of 8 rows in 4 shards."""
    out = tmp_path_factory.mktemp("run") / "data"
    assert invoke("gen-data", "--n", 8, "--out", out, *GEN).exit_code == 0
    return out


@pytest.mark.parametrize("field,value,says", [
    ("n_rows", 10**9, "'n_rows' in shards of 2 rows must make at most 1_000_000 shard files"),
    ("n_rows", "8", "'n_rows' must be a whole number in 1..1_000_000_000"),
    ("shard_size", 0, "'shard_size' must be a whole number in 1..1_000_000_000"),
    ("shards", [{"file": "x"}], "'shards' must list the 4 shard files"),
])
def test_a_hostile_manifest_is_one_line_naming_the_file_and_the_field(data, tmp_path, field, value, says):
    data = Path(shutil.copytree(data, tmp_path / "data"))
    manifest = json.loads((data / "popyou_stage.json").read_text())
    manifest[field] = value
    (data / "popyou_stage.json").write_text(json.dumps(manifest))
    for args in (["verify", data], ["materialize", data, tmp_path / "flat"],
                 ["caption", "--data", data, "--out", tmp_path / "cap", "--workers", 0, *DATA]):
        line = one_line_error(invoke(*args))
        assert f"{data / 'popyou_stage.json'}: {says}" in line, line


def test_verify_says_so_on_a_folder_that_is_not_popyous(tmp_path):
    for folder in (Path("/proc/self"), tmp_path):
        line = one_line_error(invoke("verify", folder))
        assert f"{folder} is not a popyou stage folder" in line


def test_a_named_pipe_or_an_unreadable_file_in_an_image_column_is_a_row_error(tmp_path):
    import datasets
    import numpy as np
    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(good)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    paths = [str(good), str(fifo), str(tmp_path / "gone.png"), str(good)]
    datasets.Dataset.from_dict({"image": paths}).save_to_disk(str(tmp_path / "paths"))
    # In its own process with a timeout: a regression would block on the pipe forever.
    proc = subprocess.run([sys.executable, "-m", "popyou_cli", "caption", "--data", str(tmp_path / "paths"), "--out",
                           str(tmp_path / "cap"), "--workers", "1", *map(str, DATA)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = load_stage(tmp_path / "cap")["caption_error"]
    assert errors[0] == errors[3] == ""
    assert "named pipe" in errors[1] and str(fifo) in errors[1]
    assert "No such file" in errors[2]


def test_an_unreadable_image_file_is_reported_as_unreadable():
    import tempfile

    from popyou_cli.data.runner import open_image

    with tempfile.TemporaryDirectory() as folder:
        secret = Path(folder) / "secret.png"
        secret.write_bytes(b"not for you")
        secret.chmod(0)
        os.chmod(folder, 0o755)
        if os.geteuid() != 0:
            error = open_image(str(secret))[1]
        else:  # root reads any file: ask as nobody, in a process of its own
            if any(not os.stat(p).st_mode & stat.S_IXOTH for p in [*secret.parents][:-1]):
                pytest.skip(f"{folder} is not reachable by another user")
            proc = subprocess.run([sys.executable, "-c", "import os, sys, popyou_cli.core.files, popyou_cli.core.images; "
                                   "from popyou_cli.data.runner import open_image; os.setgid(65534); os.setuid(65534); "
                                   "print(open_image(sys.argv[1])[1])", str(secret)], cwd=REPO, capture_output=True,
                                  text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-2000:]
            error = proc.stdout
    assert f"cannot read the image file {secret}: Permission denied" in error, error
