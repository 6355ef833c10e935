"""Shared test setup: offline, one thread, the golden folder found through POPYOU_GOLDEN_DIR."""
import os

# Set before torch / huggingface are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

HERE = Path(__file__).resolve().parent


def golden_dir() -> Path:
    return Path(os.environ.get("POPYOU_GOLDEN_DIR", HERE.parent.parent / "shared" / "golden")).resolve()


@pytest.fixture(scope="session")
def golden() -> Path:
    var = golden_dir() / "var"
    if not (var / "tiny_cases.safetensors").is_file():
        pytest.skip(f"golden data not found at {var} (set POPYOU_GOLDEN_DIR to the shared/golden folder)")
    return var


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """Runs examples/quickstart.sh once (the whole tiny chain, as a user would, with the installed command);
    tests of sample and eval reuse its pipeline. Returns (work dir, completed process)."""
    import subprocess
    import sys

    work = tmp_path_factory.mktemp("quickstart") / "qs"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "COLUMNS": "200"}
    proc = subprocess.run(["bash", str(HERE.parent / "examples" / "quickstart.sh"), str(work)], env=env,
                          capture_output=True, text=True, timeout=900)
    return work, proc


def gif_duration_ms(path) -> int:
    """Total play time of a GIF. Pillow merges identical consecutive frames into one longer frame, so the frame
    count depends on the pictures; the total duration does not."""
    from PIL import Image, ImageSequence

    with Image.open(path) as gif:
        return sum(frame.info.get("duration", 0) for frame in ImageSequence.Iterator(gif))
