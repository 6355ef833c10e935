"""One writer per output folder: an exclusive OS file lock on `OUT/.popyou.lock`.

`fcntl.flock` locks belong to the open file, so the kernel drops them when the process ends, however it ends:
a `kill -9` or a power cut never leaves a stale lock, and nothing has to be cleaned up by hand. The lock file
stays in the folder (hidden); while locked it holds the holder's PID, host and command, which is what a second
writer is told.

Within one Python process a folder may be locked again (a notebook, or the tests, running stages one after
another): flock would refuse a second open file of the same process, so this module counts the holders per
folder and shares one open file among them. Processes of one `accelerate launch` are separate processes: the
stages lock on the main process only, the others work under its lock.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
from pathlib import Path

from .errors import PopyouError

LOCK_FILE = ".popyou.lock"

_held: dict[str, list] = {}  # real path of the lock file -> [open file, number of FolderLock holders]
_guard = threading.Lock()


def _holder_text(path: Path) -> str:
    """'PID 123 on host-a (popyou finetune ...)' as the lock file records it, or a vaguer phrase."""
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process (it has not recorded its PID yet)"
    command = f" ({info['command'][:80]})" if info.get("command") else ""
    return f"PID {info['pid']} on {info.get('host', 'an unknown host')}{command}"


class FolderLock:
    """Holds the lock of one folder until `release()` (or until this object is garbage collected)."""

    def __init__(self, folder: str | os.PathLike, what: str = "output folder"):
        try:
            import fcntl
        except ImportError:  # Windows: no flock; popyou's runs are not protected there
            fcntl = None
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._key: str | None = None
        key = os.path.realpath(self.path)
        with _guard:
            if key in _held:  # this process holds it already: share the open file
                _held[key][1] += 1
                self._key = key
                return
            if fcntl is None:
                return
            try:
                f = open(self.path, "a+", encoding="utf-8")  # never truncates before the lock is ours
            except OSError as e:
                raise PopyouError(f"cannot create the lock file in {what} {self.folder}: {e.strerror or e}") from None
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise PopyouError(f"{what} {self.folder} is in use by {_holder_text(self.path)}; wait for it to "
                                  "finish or stop it, or choose another folder") from None
            except OSError as e:  # a filesystem without locks: say so rather than run unprotected in silence
                f.close()
                raise PopyouError(f"cannot lock {what} {self.folder} ({e.strerror or e}); "
                                  "use a folder on a local or lock-capable filesystem") from None
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))}
            f.seek(0)
            f.truncate()
            f.write(json.dumps(info))
            f.flush()
            _held[key] = [f, 1]
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
                entry[0].close()  # closing the file drops the flock

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a stage that failed in a long-lived process (a notebook) must not keep the folder
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def lock_folder(folder: str | os.PathLike, what: str = "output folder") -> FolderLock:
    """The folder's lock, or a one-line PopyouError naming the process that holds it."""
    return FolderLock(folder, what)
