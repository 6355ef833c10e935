"""Files that popyou commits: written whole or not at all, only inside folders popyou owns, never through a link;
folders checked for writing before the work starts.

`atomic_write` creates a new hidden temporary file beside the target (O_EXCL | O_NOFOLLOW: a name planted in
advance, a symbolic link included, is refused rather than written through), fsyncs it, renames it into place
(a rename replaces a link, it never follows one) and fsyncs the folder, so a reader (or a rerun after a kill or
a power cut) sees either the old file, or nothing, or the complete new one, never a part. Every file popyou
commits goes through it: dataset shards and manifests, PNGs, JSON and JSONL, model, adapter and checkpoint
weights. A committed file gets the mode the umask gives a new file (0644 under the usual 022), whatever the
library that wrote it chose (safetensors writes 0600).

A full disk while committing is one line naming the disk, its free space and what the write needed
(`disk_full_error`, for any module that writes). Reading refuses what is not a regular file (`open_regular`): a
named pipe or a device in a data set would otherwise block a stage forever.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable

from popyou_cli.core.errors import PopyouError, short_error
from popyou_cli.core.presets import TINY

TMP_SUFFIX = ".tmp"  # temporary files are named ".<final name>.<pid>.<hex>.tmp": hidden, and easy to sweep
_TMP_RE = re.compile(r"^\..+\.(\d+)(\.[0-9a-f]{8})?\.tmp$")
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def temporary_name(final: Path) -> Path:
    """A hidden name beside `final`, unique to this process and call."""
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def umask() -> int:
    """The process umask, read without changing it where the platform allows (os.umask is not thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file(path: Path) -> int:
    """A new regular file, opened for writing: never an existing name, never through a link."""
    return os.open(path, _NEW_FILE, 0o666)


@contextlib.contextmanager
def committing(path: str | os.PathLike, need: int | None = None):
    """Yields a temporary path beside `path` (created empty, exclusively) for a library that writes files by
    name (safetensors, PIL, torchvision); on a clean exit the file gets the umask's mode, is fsynced and renamed
    to `path`, on an error it is removed (a full disk becomes disk_full_error's one line, with `need`)."""
    final = Path(path)
    tmp = temporary_name(final)
    os.close(_new_file(tmp))
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.fchmod(fd, 0o666 & ~umask())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = disk_full_error(e, final, need) if isinstance(e, Exception) else None
        if full is not None:
            raise full from None
        raise
    fsync_dir(final.parent)


class _Recorder:
    """A binary file that remembers the OSError its write raised: torch.save reports one as a RuntimeError
    ("enforce fail at inline_container.cc"), which names neither the cause nor the file."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):  # flush, tell, seek... as the file has them
        return getattr(self.f, name)


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable[[BinaryIO], Any]) -> Path:
    """Commit `content` (bytes, text as UTF-8, or a function writing into the open binary file) to `path`."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    with committing(path, None if callable(data) else len(data)) as tmp:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)), "wb") as raw:
            f = _Recorder(raw)
            try:
                content(f) if callable(data) else f.write(data)
            except Exception as e:  # torch and pyarrow wrap what the file raised: raise that, it says why
                if f.error is not None and e is not f.error:
                    raise f.error from None
                raise
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kw) -> Path:
    """`obj` as indented JSON (json.dumps options pass through: sort_keys, default)."""
    return atomic_write(path, json.dumps(obj, indent=2, **dumps_kw))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Appends `line` and a newline to a log file popyou owns (metrics.jsonl), never through a link."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0), 0o666)
    with open(fd, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def fsync_dir(path: Path) -> None:
    # Makes a rename itself durable; some platforms cannot open or fsync a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------ a full disk
def _mount_point(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class DiskFull(PopyouError):
    """A full disk, as one line (disk_full_error); `cause` is the library's error, `path` the file written."""

    def __init__(self, message: str, cause: BaseException, path: Path):
        super().__init__(message)
        self.cause, self.path = cause, path


def is_disk_full(err: BaseException) -> bool:
    """A full disk or quota, however the library words it: OSError ENOSPC/EDQUOT, safetensors' IoError code 28."""
    if isinstance(err, DiskFull):
        return True
    if isinstance(err, OSError):
        return err.errno in _DISK_FULL
    text = str(err)
    return "No space left on device" in text or "StorageFull" in text or "code: 28," in text


def disk_full_error(err: BaseException, path: str | os.PathLike, need: int | None = None) -> DiskFull | None:
    """The one-line error (a PopyouError) for `err` when it is a full disk, else None: the disk (its mount point)
    and its free space, the file being written, and `need`, the bytes the write needs when the caller knows
    them. Any module that writes can use it: `except OSError as e: raise disk_full_error(e, path) or e`."""
    if not is_disk_full(err):
        return None
    cause = err.cause if isinstance(err, DiskFull) else err
    path = Path(path)
    disk = _mount_point(path.parent)
    try:
        free = _size(shutil.disk_usage(disk).free) + " free"
    except OSError:
        free = "free space unknown"
    needs = f"; it needs about {_size(need)}" if need else ""
    quota = " (disk quota exceeded)" if isinstance(cause, OSError) and cause.errno != errno.ENOSPC else ""
    return DiskFull(f"no space left on the device at {disk}{quota} ({free}) while writing {path}{needs}; free some "
                    "space or choose another --out, then rerun the same command: finished shards and checkpoints "
                    "are kept, and nothing half written is left in their place", cause, path)


# ------------------------------------------------------------------------------------------ reading, removing
def open_regular(path: str | os.PathLike, what: str = "file") -> BinaryIO:
    """`path` opened for binary reading, or a one-line PopyouError when it is no regular file: a named pipe, a
    device or a socket would block or never end. The open itself cannot block (O_NONBLOCK, cleared after)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise PopyouError(f"cannot read the {what} {path}: {e.strerror or short_error(e)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a named pipe, device or socket"
            raise PopyouError(f"the {what} {path} is {kind}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, what: str = "file", limit: int | None = None) -> bytes:
    """The bytes of a regular file (open_regular); `limit`: refuse a larger one in one line, before reading."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if limit is not None and size > limit:
            raise PopyouError(f"the {what} {path} is {_size(size)}, more than the {_size(limit)} popyou reads")
        return f.read()


def remove(path: str | os.PathLike) -> None:
    """Removes a file, a link (never what it points to) or a folder tree; nothing there is fine."""
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def sweep_temporaries(folder: str | os.PathLike, *, prefix: str = "", locked: bool = True) -> list[str]:
    """Removes the hidden temporary files and folders (".NAME.PID.HEX.tmp") a killed run left in `folder`; with
    `prefix`, only those of ".<prefix>...". locked: the caller holds the folder's lock, so every temporary there
    is an orphan; else only those whose process is gone (on this host) are. Returns the names removed."""
    removed = []
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            m = _TMP_RE.match(name)
            if m and name.startswith("." + prefix) and int(m.group(1)) != os.getpid() and (
                    locked or not _pid_alive(int(m.group(1)))):
                with contextlib.suppress(OSError):
                    remove(Path(folder) / name)
                    removed.append(name)
    return removed


# ------------------------------------------------------------------------------------------ folders
def cache_root() -> Path:
    """popyou's own cache: $POPYOU_CACHE, else $XDG_CACHE_HOME/popyou, else ~/.cache/popyou."""
    if os.environ.get("POPYOU_CACHE"):
        return Path(os.environ["POPYOU_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "popyou"



def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """tempfile.mkdtemp in `parent` with the mode the umask gives a new folder (mkdtemp makes it 0700, and a
    folder renamed into place would keep that)."""
    p = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(p, 0o777 & ~umask())
    return p


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
        raise disk_full_error(e, p / ".popyou-probe") or PopyouError(
            f"cannot write to {what} {p}: {e.strerror or e}") from None
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


def resolve_recorded(spec: str | None, folder: str | os.PathLike, *, inside: bool = False) -> str | None:
    """The inverse of portable_path for a spec read from `folder`'s records: a relative path that exists there
    becomes a usable path; Hub ids, "tiny" and absolute paths stay as they are.
    inside: the record names a file of the folder itself (samples.jsonl's images): an absolute path, a way up
    (..) or a link that leads out of the folder is a one-line PopyouError, so a folder someone shared cannot make
    popyou read files elsewhere."""
    if inside:
        return str(_inside(spec, Path(folder)))
    if not spec or os.path.isabs(spec) or spec == TINY:
        return spec
    candidate = Path(folder) / spec
    return str(candidate) if candidate.exists() else spec


def _inside(name: str | None, folder: Path) -> Path:
    where = os.path.realpath(folder)
    path = folder / str(name or "")
    if not name or os.path.isabs(name) or os.path.commonpath([where, os.path.realpath(path)]) != where:
        raise PopyouError(f"{folder}: a record names '{name}', which is not a file inside the folder; popyou reads "
                          "only the folder's own files (a path relative to it, no '..', no link out)")
    return path


def check_ours(out: str | os.PathLike, records: tuple[str, ...], *, overwrite: bool, command: str,
               own_names: re.Pattern | None = None, what: str = "--out") -> None:
    """Before `command` writes its files into `out`: a folder that holds visible files but none of `records` (the
    record `command` writes, as a regular file) was not written by popyou, and its files (a grid.png, a report.md)
    are someone's own: a one-line PopyouError unless `overwrite`, which lets the command replace the files of the
    names it writes and nothing else. A missing or empty folder, one popyou wrote, or (own_names) one whose every
    file is named as the command names its files, is fine."""
    o = Path(out)
    if overwrite or not o.is_dir():
        return
    visible = [c for c in o.iterdir() if not c.name.startswith(".")]
    if not visible or any(stat.S_ISREG(os.lstat(o / r).st_mode) for r in records if os.path.lexists(o / r)):
        return
    if own_names is not None and all(own_names.fullmatch(c.name) and c.is_file() for c in visible):
        return
    raise PopyouError(f"{what} {out} is not empty and popyou did not write it (no {' or '.join(records)} in it): its "
                      f"files could be replaced; choose an empty or new folder, or pass --overwrite to let {command} "
                      "write into it (only the files it writes are replaced)")


def portable_spec(spec: str | os.PathLike | None, folder: str | os.PathLike) -> str | None:
    """A model or data spec as a record in `folder`: a local path made portable (portable_path); a Hub id,
    "tiny" or None as it is."""
    if spec is None or str(spec) == TINY or not os.path.exists(os.path.expanduser(str(spec))):
        return None if spec is None else str(spec)
    return portable_path(spec, folder)
