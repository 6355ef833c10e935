"""Files that popyou commits: written whole or not at all, and folders checked for writing before the work starts.

`atomic_write` writes into a hidden temporary file beside the target, fsyncs it, renames it into place and
fsyncs the folder, so a reader (or a rerun after a kill or a power cut) sees either the old file, or nothing, or
the complete new one, never a part. Every file popyou commits goes through it: dataset shards and manifests,
PNGs, JSON and JSONL, model, adapter and checkpoint weights.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .errors import PopyouError

TMP_SUFFIX = ".tmp"  # temporary files are named ".<final name>.<pid>.<hex>.tmp": hidden, and easy to sweep


def temporary_name(final: Path) -> Path:
    """A hidden name beside `final`, unique to this process and call."""
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


@contextlib.contextmanager
def committing(path: str | os.PathLike):
    """Yields a temporary path beside `path` for a library that writes files by name (safetensors, PIL); on a
    clean exit the file is fsynced and renamed to `path`, on an error it is removed."""
    final = Path(path)
    tmp = temporary_name(final)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable[[BinaryIO], Any]) -> Path:
    """Commit `content` (bytes, text as UTF-8, or a function writing into the open binary file) to `path`."""
    with committing(path) as tmp, open(tmp, "wb") as f:
        if callable(content):
            content(f)
        else:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kw) -> Path:
    """`obj` as indented JSON (json.dumps options pass through: sort_keys, default)."""
    return atomic_write(path, json.dumps(obj, indent=2, **dumps_kw))


def fsync_dir(path: Path) -> None:
    # Makes a rename itself durable; some platforms cannot open or fsync a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `path` if needed and prove a file can be written in it, before any expensive work."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise PopyouError(f"{what} {p} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".popyou-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise PopyouError(f"cannot write to {what} {p}: {e.strerror or e}") from None
    return p


def portable_path(target: str | os.PathLike, folder: str | os.PathLike) -> str:
    """How a folder popyou writes records a local path: relative to that folder, so the record survives moving
    the folders together and leaks nothing when uploaded. A target that shares only a top folder with it (/, /home,
    another disk) is recorded by its name alone: the way up would spell out someone's directory tree."""
    t = os.path.realpath(os.path.expanduser(target))
    f = os.path.realpath(folder)
    try:
        common = os.path.commonpath([t, f])
    except ValueError:  # different drives (Windows)
        common = ""
    if not common or len(Path(common).parts) < 3:
        return os.path.basename(t)
    return os.path.relpath(t, f)


def resolve_recorded(spec: str | None, folder: str | os.PathLike) -> str | None:
    """The inverse of portable_path for a spec read from `folder`'s records: a relative path that exists there
    becomes a usable path; Hub ids, "tiny" and absolute paths stay as they are."""
    if not spec or os.path.isabs(spec) or spec == "tiny":
        return spec
    candidate = Path(folder) / spec
    return str(candidate) if candidate.exists() else spec


def portable_spec(spec: str | os.PathLike | None, folder: str | os.PathLike) -> str | None:
    """A model or data spec as a record in `folder`: a local path made portable (portable_path); a Hub id,
    "tiny" or None as it is."""
    if spec is None or str(spec) == "tiny" or not os.path.exists(os.path.expanduser(str(spec))):
        return None if spec is None else str(spec)
    return portable_path(spec, folder)
