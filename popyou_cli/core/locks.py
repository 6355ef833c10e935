"""One writer per output folder: an exclusive OS file lock on `OUT/.popyou.lock`.

`fcntl.flock` locks belong to the open file, so the kernel drops them when the last descriptor of that open
file is closed, however the process ends: a `kill -9` or a power cut never leaves a stale lock, and nothing
has to be cleaned up by hand. The lock file stays in the folder (hidden); while locked it holds the holder's
PID, host and command (the popyou subcommand only: no paths), which is what a second writer is told.

The lock dies with the process that took it, not with its children:
* the descriptor is close-on-exec (O_CLOEXEC), so a program started by popyou never holds it;
* a child made by fork (DataLoader workers are forked) would share the open file, and so the lock: a worker
  orphaned by a `kill -9` of its parent would keep the folder locked until it noticed and exited, seconds
  later. `os.register_at_fork` closes the child's copy right after every fork, before the child runs any of
  popyou's code. Closing a copy never unlocks (flock is released only with the last copy), so the parent
  keeps its lock, and a forked child never holds one. This covers every fork, whoever starts it; flock's
  open-file semantics (and OFD locks', which behave the same) give no way to do it in the parent alone.

The lock file is opened without following a symbolic link (O_NOFOLLOW) and must be a regular file with no
other name (a hard link): a lock file planted as a link to a file elsewhere is refused, never written through.

Within one Python process a folder may be locked again (a notebook, or the tests, running stages one after
another): flock would refuse a second open file of the same process, so this module counts the holders per
folder and shares one descriptor among them. Processes of one `accelerate launch` are separate processes: the
stages lock on the main process only, the others work under its lock.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import threading
from pathlib import Path

from popyou_cli.core.errors import PopyouError

LOCK_FILE = ".popyou.lock"
_OPEN = (os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
         | getattr(os, "O_NONBLOCK", 0))

_held: dict[str, list] = {}  # real path of the lock file -> [descriptor, number of FolderLock holders]
_guard = threading.Lock()


def _forget_after_fork() -> None:
    """In a forked child: close its copies of the lock descriptors (see the module docstring)."""
    global _guard
    for fd, _ in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()
    _guard = threading.Lock()  # another thread of the parent may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _holder_text(fd: int) -> str:
    """'PID 123 on host-a (popyou finetune)' as the lock file records it, or a vaguer phrase."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        return "another process (it has not recorded its PID yet)"
    command = f" ({str(info['command'])[:80]})" if info.get("command") else ""
    return f"PID {info['pid']} on {str(info.get('host', 'an unknown host'))[:64]}{command}"


def _open_lock_file(path: Path, what: str, folder: Path) -> int:
    """The lock file's descriptor: created if needed, never through a link, a regular file of one name."""
    try:
        fd = os.open(path, _OPEN, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PopyouError(f"the lock file {path} is a symbolic link; popyou never writes through a link: "
                              f"delete the link (rm {path}) and rerun") from None
        raise PopyouError(f"cannot create the lock file in {what} {folder}: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        kind = "has another name (a hard link)" if stat.S_ISREG(st.st_mode) else "is not a regular file"
        raise PopyouError(f"the lock file {path} {kind}; popyou never writes into a file it did not make: delete "
                          f"it (rm {path}) and rerun")
    return fd


class FolderLock:
    """Holds the lock of one folder until `release()` (or until this object is garbage collected).
    command: what a second writer is told holds the folder (e.g. "popyou caption")."""

    def __init__(self, folder: str | os.PathLike, what: str = "output folder", command: str = "popyou"):
        try:
            import fcntl
        except ImportError:  # Windows: no flock; popyou's runs are not protected there
            fcntl = None
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._key: str | None = None
        key = os.path.realpath(self.folder) + os.sep + LOCK_FILE
        with _guard:
            if key in _held:  # this process holds it already: share the descriptor
                _held[key][1] += 1
                self._key = key
                return
            if fcntl is None:
                return
            fd = _open_lock_file(self.path, what, self.folder)  # never truncated before the lock is ours
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_text(fd)
                os.close(fd)
                raise PopyouError(f"{what} {self.folder} is in use by {holder}; wait for it to finish or stop "
                                  "it, or choose another folder") from None
            except OSError as e:  # a filesystem without locks: say so rather than run unprotected in silence
                os.close(fd)
                raise PopyouError(f"cannot lock {what} {self.folder} ({e.strerror or e}); "
                                  "use a folder on a local or lock-capable filesystem") from None
            info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command}).encode()
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, info, 0)
            except OSError as e:
                os.close(fd)
                from popyou_cli.core.files import disk_full_error

                raise disk_full_error(e, self.path) or PopyouError(
                    f"cannot write the lock file {self.path}: {e.strerror or e}") from None
            _held[key] = [fd, 1]
            self._key = key

    def release(self) -> None:
        """Gives the lock up (the last holder in this process unlocks the file). Safe to call twice."""
        key, self._key = self._key, None
        if key is None:
            return
        with _guard:
            entry = _held.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                os.close(entry[0])  # closing the last descriptor drops the flock

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a stage that failed in a long-lived process (a notebook) must not keep the folder
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def claim_output_folder(out: str | os.PathLike, *, command: str, overwrite: bool = False, own_names=None,
                        subfolders: tuple[str, ...] = ()) -> FolderLock:
    """What `sample` and `eval` do before writing into --out, as every other command does: make it and prove it
    writable, refuse a folder popyou did not write (files.check_ours: formats.OUTPUT_RECORDS, or `own_names`, mark
    popyou's), take its lock (a second writer is refused in one line, naming this process), then remove the
    temporaries a killed run left in it and in `subfolders`. Returns the lock: release it when the files are
    written."""
    from popyou_cli.core.files import check_ours, ensure_writable_dir, sweep_temporaries
    from popyou_cli.core.formats import OUTPUT_RECORDS

    check_ours(out, OUTPUT_RECORDS, overwrite=overwrite, command=command, own_names=own_names)
    folder = ensure_writable_dir(out)
    lock = FolderLock(folder, "--out", command)
    for sub in ("", *subfolders):
        sweep_temporaries(folder / sub)  # under the lock: every temporary there is an orphan
    return lock
