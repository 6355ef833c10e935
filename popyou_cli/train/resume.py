"""Checkpoints of a training run, and resuming only what is the same run (training.py's loop calls these).

A run is defined by its settings (`run_definition`): the data (by content), the model it starts from (a local
one by the hash of its files), the schedule, the batch layout, LoRA and the stage's own options. Every
checkpoint records them in trainer_state.json (`run`). Which checkpoint a run starts from (`--resume`):

* auto (the default): the newest checkpoint in OUT when it was made by the same run, so rerunning a killed
  command continues it; a fresh start when OUT has none; a one-line error listing the differences when OUT
  holds another run's checkpoints.
* never: a fresh start (OUT holding checkpoints is refused unless --overwrite, which deletes them).
* latest, or a checkpoint folder PATH: that checkpoint, checked like auto.

`--resume-with-changes` continues from a checkpoint of another run definition on purpose: the weights,
optimizer moments and data position are restored, then this command's settings (learning rate, schedule,
weight decay...) replace the checkpoint's, and the change is recorded (`history`, also in config.json).
Checkpoints are written to `step-N.tmp/` and renamed; leftovers of a killed write are removed at the next start.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from popyou_cli.core.bounds import MAX_BATCH, MAX_STEPS
from popyou_cli.core.errors import PopyouError, short_error
from popyou_cli.core.files import atomic_write, atomic_write_json, committing, fsync_dir
from popyou_cli.core.presets import TrainPreset

_STEP_DIR = re.compile(r"^step-(\d+)$")
RESUME_MODES = ("auto", "never", "latest")
# TrainPreset fields that define a run: a checkpoint resumes only under the same values.
DEFINING_FIELDS = ("lora", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "hidden_dim",
                   "adapter_init_gain", "alpha", "beta", "label_smoothing", "scale_weights", "cond_drop", "hflip",
                   "val_fraction", "lr", "batch_size", "grad_accum", "max_steps", "epochs", "warmup", "schedule",
                   "min_lr_ratio", "weight_decay", "betas", "grad_clip", "mixed_precision", "seed")
# The others: how often to save, log or sample, where to report, how to save LoRA, and the model, which the
# stages compare by content (fingerprint), not by its spelling. Every TrainPreset field is in one of the two.
RUN_OPTIONS = ("var", "lora_save", "save_every", "keep_last", "log_every", "report_to", "resume",
               "resume_with_changes", "sample_every", "n_samples", "sample_cfg", "sample_top_k", "sample_top_p")
_SKIP_DIRS = {"checkpoints", "samples", "logs"}  # run-folder parts that are not the model
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


# ------------------------------------------------------------------------------------------ what a run is
def fingerprint(spec: str | os.PathLike | None) -> str | None:
    """What identifies a model or folder a run starts from: a Hub id or "tiny" as it is; a local file or folder
    by the sha256 of its weight files (a moved copy is the same, a retrained one is not)."""
    if spec is None:
        return None
    p = Path(spec).expanduser()
    if not p.exists():
        return str(spec)
    from popyou_cli.store.lineage import hash_file

    # Weights only: config.json and the model card also record when and how the folder was written (a resumed
    # run says so), which must not make the same weights another model.
    files = [p] if p.is_file() else sorted(
        f for f in p.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES and not any(
            part.startswith(".") or part in _SKIP_DIRS for part in f.relative_to(p).parts))
    h = hashlib.sha256()
    for f in files:
        digest = _safetensors_hash(f) if f.suffix == ".safetensors" else hash_file(f)[0]
        h.update(f"{f.relative_to(p) if f != p else f.name} {digest}\n".encode())
    return "sha256:" + h.hexdigest()


def _safetensors_hash(path: Path) -> str:
    """The tensors of a .safetensors file (names, dtypes, shapes, bytes), not its free-form metadata: safetensors
    writes the metadata keys in no fixed order, so the same weights saved twice can differ in their header."""
    import struct

    h = hashlib.sha256()
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        h.update(json.dumps(header, sort_keys=True).encode())
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def data_fingerprint(path: str | os.PathLike) -> str | None:
    """An encode folder's content digest (store/lineage.py), None for a folder without content hashes."""
    from popyou_cli.store import read_manifest

    content = (read_manifest(path) or {}).get("content")
    return f"sha256:{content}" if content else None


def run_definition(cfg: TrainPreset, **stage) -> dict:
    """The settings that define a run: the defining TrainPreset fields plus the stage's own (data, model...)."""
    d = asdict(cfg)
    return json.loads(json.dumps({**{k: d[k] for k in DEFINING_FIELDS}, **stage}, default=str))


def differences(old: dict | None, new: dict) -> dict:
    """{setting: [checkpoint's value, this run's]} for every setting that differs."""
    if old is None:
        return {"settings": ["not recorded (an older popyou)", "this run's"]}
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def _show(changes: dict) -> str:
    def short(v) -> str:
        s = str(v)
        return s[:19] if s.startswith("sha256:") else s[:60]

    return "; ".join(f"{k} {short(b)} (checkpoint: {short(a)})" for k, (a, b) in changes.items())


# ------------------------------------------------------------------------------------------ the run folder
def lock_run(acc, run_dir: Path, command: str = "popyou"):
    """The run folder's lock (locks.py), taken by the main process for the whole launch; a refusal reaches every
    process as the same one-line error. Returns the lock (release it at the end) or None on other processes.
    command: what a second run is told holds the folder ("popyou finetune")."""
    from popyou_cli.core.locks import FolderLock
    from popyou_cli.core.processes import on_main_process

    return on_main_process(acc, lambda: FolderLock(run_dir, "run folder", command))


def checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a `.tmp` folder is an unfinished write and never counts)."""
    d = run_dir / "checkpoints"
    found = [(int(m.group(1)), p) for p in (d.iterdir() if d.is_dir() else []) if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def remove_unfinished(run_dir: Path) -> None:
    """What a killed run left half written, removed at the next start (under the run's lock): checkpoint folders
    (step-N.tmp) and the hidden temporary files of the run folder and of the folders popyou writes in it."""
    from popyou_cli.core.files import remove, sweep_temporaries

    d = run_dir / "checkpoints"
    for p in d.glob("step-*.tmp") if d.is_dir() else []:
        remove(p)
    for folder in (run_dir, d, run_dir / "samples", run_dir / "model", run_dir / "pipeline"):
        sweep_temporaries(folder)


def remove_checkpoints(run_dir: Path) -> None:
    """--overwrite: the run's checkpoints go, and only them (step-N folders): whatever else the user keeps in the
    checkpoints folder stays."""
    from popyou_cli.core.files import remove

    d = run_dir / "checkpoints"
    for p in d.iterdir() if d.is_dir() else []:
        if _STEP_DIR.match(p.name) or (p.name.startswith("step-") and p.name.endswith(".tmp")):
            remove(p)


def resolve_resume(resume: str | None, run_dir: Path, overwrite: bool = False) -> Path | None:
    """The checkpoint to start from (None: a fresh start); see the module docstring."""
    resume = resume or "auto"
    found = checkpoints(run_dir)
    if overwrite:
        if resume not in ("auto", "never"):
            raise PopyouError(f"--overwrite starts {run_dir} over; it cannot be combined with --resume {resume}")
        return None
    if resume == "never":
        if found:
            raise PopyouError(f"{run_dir} already holds checkpoints (last {found[-1].name}); pass --overwrite to "
                              "start over, --resume auto to continue, or choose another --out")
        return None
    if resume in ("auto", "latest"):
        return found[-1] if found else None  # nothing yet: a first run, so the same command can always be rerun
    p = Path(resume)
    if not (p / "trainer_state.json").is_file():
        raise PopyouError(f"--resume {resume}: not a checkpoint folder (expected .../checkpoints/step-N, or one "
                          f"of {', '.join(RESUME_MODES)})")
    return p


def read_state(path: Path) -> dict:
    """trainer_state.json of a checkpoint, checked against its schema before any number in it is used."""
    from popyou_cli.core.files import read_regular

    file = path / "trainer_state.json"
    try:
        state = json.loads(read_regular(file, "trainer state", 64 << 20))
    except (OSError, ValueError, PopyouError) as e:
        raise PopyouError(f"cannot resume from {path}: its trainer_state.json is unreadable ({short_error(e, 100)}); "
                          f"delete {path} to resume from an earlier checkpoint, or pass --overwrite") from None
    check_state(state, file)
    return state


def check_state(state, file: Path) -> None:
    """A one-line error naming the file and the field for a trainer state no run could have written."""
    def bad(field: str, want: str) -> PopyouError:
        got = json.dumps(state.get(field) if isinstance(state, dict) else state)[:60]
        return PopyouError(f"{file}: '{field}' {want} (got {got}); the checkpoint is damaged: delete "
                           f"{file.parent} to resume from an earlier one, or pass --overwrite")

    if not isinstance(state, dict):
        raise bad("trainer state", "must be a JSON object")
    limits = {"step": MAX_STEPS, "total": MAX_STEPS, "micro": MAX_STEPS * MAX_BATCH}
    for field, high in limits.items():
        value = state.get(field, 0 if field == "total" else None)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise bad(field, f"must be a whole number in 0..{high:_}")
    if not isinstance(state.get("run", {}), (dict, type(None))):
        raise bad("run", "must be a JSON object")
    if not isinstance(state.get("history", []), list):
        raise bad("history", "must be a list")


def check_resume(path: Path, run: dict, cfg: TrainPreset, run_dir: Path) -> dict:
    """The checkpoint's settings against this run's: {} when equal, the changes when --resume-with-changes is
    given, else a one-line error listing them."""
    changes = differences(read_state(path).get("run"), run)
    if not changes or cfg.resume_with_changes:
        return changes
    fixes = (f"pass --resume-with-changes to continue from {path.name} with this command's settings (recorded in "
             "config.json), --overwrite to start over, or choose another --out")
    if (cfg.resume or "auto") == "auto":
        raise PopyouError(f"{run_dir} holds checkpoints of another run (last {path.name}: {_show(changes)}); {fixes}")
    raise PopyouError(f"cannot resume from {path}: it was made with other settings ({_show(changes)}); {fixes}")


# ------------------------------------------------------------------------------------------ checkpoint files
def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    """Every RNG as tensors, lists and numbers, so the file loads with torch.load(weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    st = {"python": [py_version, list(py_state), py_gauss],
          "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    py_version, py_state, py_gauss = st["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = st["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(acc, model, opt, sched, state: dict, run_dir: Path, keep_last: int) -> Path:
    """step-N.tmp/ written by every rank (its RNG) and rank 0 (the rest), then renamed by rank 0 to step-N/:
    a kill at any moment leaves either the complete checkpoint or none. Needs a folder all ranks share. Each
    file is fsynced (files.atomic_write) before the rename, so the rename never publishes unwritten data. A
    failed write (a full disk) removes the half-written folder before the error goes on."""
    from safetensors.torch import save_file

    def torch_file(path: Path, obj) -> None:
        atomic_write(path, lambda f: torch.save(obj, f))

    from popyou_cli.core.files import disk_full_error, remove

    final = run_dir / "checkpoints" / f"step-{state['step']}"
    tmp = final.with_name(final.name + ".tmp")
    if acc.is_main_process:
        remove(tmp)  # a link left there is removed, never written through
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    try:
        torch_file(tmp / f"rng-{acc.process_index}.pt", _rng_state())
        if acc.is_main_process:
            sd = {k: v.detach().contiguous().cpu() for k, v in _trainable(acc.unwrap_model(model)).items()}
            with committing(tmp / "trainable.safetensors") as path:
                save_file(sd, str(path))
            torch_file(tmp / "optimizer.pt", opt.state_dict())
            torch_file(tmp / "scheduler.pt", sched.state_dict())
            if acc.scaler is not None:
                torch_file(tmp / "scaler.pt", acc.scaler.state_dict())
            atomic_write_json(tmp / "trainer_state.json", state)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception):  # a full disk: one line naming it and what a checkpoint needs
            need = sum(p.numel() * p.element_size() for p in _trainable(acc.unwrap_model(model)).values()) * 3
            raise disk_full_error(e, tmp, need) or e
        raise
    acc.wait_for_everyone()
    if acc.is_main_process:
        remove(final)  # a rerun of the same step replaces it
        os.replace(tmp, final)
        fsync_dir(final.parent)
        for old in checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _read(path: Path, what: str, reader):
    """reader(path), with an unreadable file (truncated, corrupt, a pickle weights_only refuses) as one line."""
    from popyou_cli.core.failures import REFUSED_PICKLE

    try:
        return reader(path)
    except Exception as e:  # noqa: BLE001 - safetensors, torch.load and OS errors alike: the file is unusable
        cause = REFUSED_PICKLE if isinstance(e, pickle.UnpicklingError) else short_error(e, 100, with_type=True)
        raise PopyouError(f"cannot resume from {path.parent}: its {what} {path.name} is unreadable ({cause}); "
                          f"delete {path.parent} to resume from an earlier checkpoint, or pass --overwrite") from None


def load_checkpoint(acc, model, opt, sched, path: Path, *, changed: bool = False) -> dict:
    """Restores what save_checkpoint wrote. changed (--resume-with-changes): a checkpoint of another layout (a
    process without its RNG file starts its streams from the seed)."""
    from safetensors.torch import load_file

    state = read_state(path)
    rng = path / f"rng-{acc.process_index}.pt"
    if not rng.is_file() and not changed:
        raise PopyouError(f"{path} has no RNG state for process {acc.process_index}")
    sd = _read(path / "trainable.safetensors", "weights file", lambda p: load_file(str(p)))
    own = _trainable(acc.unwrap_model(model))
    if set(sd) != set(own):
        raise PopyouError(f"{path} holds other trainable weights than this run ({len(set(sd) ^ set(own))} names "
                          "differ: other LoRA or stage options); start over with --overwrite or another --out")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(sd[k].to(p.device, p.dtype))

    def torch_file(p: Path):
        return torch.load(p, map_location="cpu", weights_only=True)

    opt.load_state_dict(_read(path / "optimizer.pt", "optimizer state", torch_file))
    sched.load_state_dict(_read(path / "scheduler.pt", "scheduler state", torch_file))
    if acc.scaler is not None and (path / "scaler.pt").is_file():
        acc.scaler.load_state_dict(_read(path / "scaler.pt", "loss scaler state", torch_file))
    if rng.is_file():
        _set_rng_state(_read(rng, "RNG state", torch_file))
    return state
