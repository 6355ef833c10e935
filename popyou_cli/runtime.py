"""Small shared helpers for stages: device and dtype choice, seeded generators, image files written atomically."""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import torch

from .errors import PopyouError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STAGE_DTYPES = ("auto", "fp32", "fp16", "bf16")  # --dtype of the data stages (gen-data, caption, encode)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PopyouError(f"unknown device '{device}' (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PopyouError(f"--device {device} asked for, but no CUDA GPU is visible")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise PopyouError(f"unknown dtype '{dtype}' (use auto, fp32, bf16 or fp16)")
    return DTYPES[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for matmuls; embeddings, sampling and the f_hat sum stay in fp32 inside the models."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on the model's device: the same seed gives the same samples on that kind of device."""
    return torch.Generator(device=device).manual_seed(seed)


def ensure_writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".popyou-write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PopyouError(f"cannot write to {path}: {e.strerror or e}") from None
    return path


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 on CPU, rounded to nearest."""
    return images.float().mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_png(array_hw3, path: Path) -> Path:
    """Writes under a temporary name and renames, so a PNG that exists is complete."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array_hw3.numpy() if hasattr(array_hw3, "numpy") else array_hw3).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def grid(images_u8: torch.Tensor, ncol: int | None = None, pad: int = 2) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> one (rows*H, cols*W, 3) image with white gaps."""
    n, h, w, _ = images_u8.shape
    ncol = ncol or min(n, max(1, round(n**0.5 + 0.49)))
    nrow = -(-n // ncol)
    out = torch.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images_u8[i]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Shared by the data stages (gen-data, caption, encode): option checks, the accelerate multi-process protocol of
# store.py, the live progress bar, and the test hook for kill/resume tests.
# ---------------------------------------------------------------------------------------------------------------
def check_at_least_1(*flags: tuple[str, int]) -> None:
    """Refuse the first (flag, value) whose value is under 1, with the flag's name in the message."""
    for flag, value in flags:
        if value < 1:
            raise PopyouError(f"{flag} must be at least 1 (got {value})")


def check_stage_dtype(name: str) -> None:
    if name not in STAGE_DTYPES:
        raise PopyouError(f"unknown --dtype '{name}' (use {', '.join(STAGE_DTYPES)})")


def stage_dtype(name: str, device: torch.device) -> str:
    """--dtype of a data stage, checked, with auto resolved: fp16 on CUDA (SDXL-Turbo ships fp16 weights and
    BLIP-2 is usually run so), fp32 on CPUs (faster there, and exact)."""
    check_stage_dtype(name)
    if name == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return name


def stage_state(device: str):
    """accelerate's view of this launch (rank, world size, device). PartialState only joins a CPU process group
    when told it runs on CPU (AcceleratorState reads ACCELERATE_USE_CPU, PartialState does not): without cpu=True,
    torchrun on a machine without GPUs gives every process world size 1 and each would redo every shard."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def stage_device(device: str, state) -> torch.device:
    """--device for one process of a launch: auto (and plain cuda under several processes) means accelerate's
    per-process device, cuda:LOCAL_RANK or cpu, so that 8 processes do not all pile onto cuda:0."""
    if device == "auto" or (device == "cuda" and state.num_processes > 1):
        return torch.device(state.device)
    return pick_device(device)


def open_stage_writer(state, out, **kw):
    """store.StageWriter built with the multi-process protocol: the main process creates or checks the folder
    first, then the others only read its manifest. A refusal on the main process is sent to every process (the
    others would otherwise wait forever at the barrier) and raised everywhere as the same PopyouError."""
    from .store import StageWriter

    writer, error = None, None
    if state.is_main_process:
        try:
            writer = StageWriter(out, main_process=True, **kw)
        except PopyouError as e:
            error = str(e)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        raise PopyouError(error)
    if writer is None:
        kw.pop("overwrite", None)  # only the main process may wipe
        writer = StageWriter(out, main_process=False, **kw)
    return writer


@contextlib.contextmanager
def progress_bar(enabled: bool, console, total: int, label: str):
    """Yields advance(k). A live bar with images/s and an ETA on a terminal; nothing otherwise (the stages print
    a summary line at the end, which is what logs and CI keep)."""
    if not enabled or total == 0 or console is None or not console.is_terminal:
        yield lambda k: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):  # rich's own speed column speaks of bytes
        def render(self, task):
            return Text(f"{task.speed:.1f} images/s" if task.speed else "- images/s", style="cyan")

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False) as bar:
        task = bar.add_task(label, total=total)
        yield lambda k: bar.advance(task, k)


def debug_pause() -> None:
    """Sleep POPYOU_TEST_BATCH_PAUSE_S seconds (unset: no-op). Tests set it so that a run of tiny models, which
    would otherwise finish in a blink, is reliably still running when their SIGKILL lands."""
    seconds = float(os.environ.get("POPYOU_TEST_BATCH_PAUSE_S") or 0)
    if seconds > 0:
        import time

        time.sleep(seconds)
