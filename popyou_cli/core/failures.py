"""Every failure a user can cause or meet, as one line: what `cli.common.user_errors` prints for exceptions that
are not already a PopyouError (a full disk, a permission, a corrupt or truncated file, a refused pickle, a bad
encoding, memory), with what to do about it. Anything else is reported as unexpected, with the way to see the
traceback: `--debug` or POPYOU_DEBUG=1. A warning (popyou's own or a library's) is one line too (`one_line_warnings`):
`warning: MESSAGE`, without the path of the file that raised it.
"""
from __future__ import annotations

import errno
import os
import pickle
import sys
import warnings

from popyou_cli.core.errors import short_error

DEBUG_ENV = "POPYOU_DEBUG"
REFUSED_PICKLE = ("it holds Python objects beyond tensors, which popyou never unpickles (torch.load "
                  "weights_only=True); use a .safetensors file, or re-save the weights as plain tensors")


debug_flag = False  # `popyou --debug ...` (cli.py sets it on every invocation)


def debug_enabled() -> bool:
    return debug_flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


_PYTHON_SHOWWARNING = warnings.showwarning


def one_line_warnings() -> None:
    """From now on every warning is shown as `warning: MESSAGE` on stderr, one line: Python's default names the
    file and line that raised it (a path into the installed libraries) and repeats the source line. With --debug
    (or POPYOU_DEBUG=1) warnings keep Python's format."""
    if debug_enabled():
        warnings.showwarning = _PYTHON_SHOWWARNING
        return

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        try:
            print(f"warning: {' '.join(str(message).split())[:400]}", file=file or sys.stderr)
        except (OSError, ValueError):  # stderr closed: a warning is not worth a failure
            pass

    warnings.showwarning = show


def _where(err: OSError) -> str:
    return f" ({err.filename})" if getattr(err, "filename", None) else ""


def _os_error(err: OSError) -> str:
    code, where = err.errno, _where(err)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) and getattr(err, "filename", None):
        from popyou_cli.core.files import disk_full_error

        return str(disk_full_error(err, err.filename))  # names the disk and its free space
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        what = "no space left on the device" if code == errno.ENOSPC else "disk quota exceeded"
        return (f"{what}{where}; free some space (or choose another --out) and rerun the same command: finished "
                "shards and checkpoints are kept, and nothing half written is left in their place")
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}; check the folder's owner and permissions, or choose another folder"
    if code == errno.EROFS:
        return f"read-only file system{where}; choose a writable folder"
    if code == errno.ENOENT:
        return f"no such file or folder{where}"
    if code == errno.EIO:
        return f"input/output error{where}: the disk or network file system failed; check it, then rerun"
    return f"{err.strerror or short_error(err, with_type=True)}{where}"


def describe(err: BaseException) -> str:
    """One line (no newline) for an exception that reached the command line."""
    name = type(err).__name__
    if isinstance(err, OSError):
        return _os_error(err)
    if isinstance(err, UnicodeDecodeError):
        return (f"a file is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8 "
                "(--debug shows which)")
    if isinstance(err, pickle.UnpicklingError):
        return f"a weights file was refused: {REFUSED_PICKLE}"
    if name == "SafetensorError":
        return (f"a .safetensors file is truncated or corrupt ({short_error(err, 120)}); make it again, or "
                "download it again")
    if name in ("ArrowInvalid", "ArrowIOError", "ArrowException"):
        return (f"a dataset file is corrupt or truncated ({short_error(err, 120)}); 'popyou verify FOLDER' finds "
                "and sets aside damaged shards, then rerun the stage that made them")
    if name in ("DecompressionBombError", "DecompressionBombWarning"):  # PIL's, outside core/images' readers
        return f"an image is too large to decode safely ({short_error(err, 120)}); --debug shows which"
    if name == "JSONDecodeError":
        return f"a JSON file is corrupt ({short_error(err, 120)}); --debug shows which"
    from popyou_cli.core.files import is_disk_full

    if is_disk_full(err):  # a library's wording of ENOSPC (safetensors' IoError code 28)
        return ("no space left on the device; free some space (or choose another --out) and rerun the same "
                f"command ({short_error(err, 100)})")
    if name == "RuntimeError" and "inline_container" in str(err):  # torch.save given a path, not a popyou file
        return (f"torch could not write a file ({short_error(err, 100)}); the disk is most likely full: check "
                "its free space, then rerun the same command")
    if isinstance(err, MemoryError) or name == "OutOfMemoryError":
        return "out of memory; lower --batch-size (or use a smaller preset / another device)"
    return (f"unexpected error: {short_error(err, 200, with_type=True)} (rerun with --debug or {DEBUG_ENV}=1 "
            "for the traceback, and please report it)")
