"""Content hashes of shards and the lineage between stage folders (see __init__.py for the folder layout).

* When a shard is committed, its bytes are hashed as they are written (no second read) and the hash goes into
  a hidden sidecar `.shard-....arrow.sha256` (JSON: sha256, bytes, and for a short shard that grew, the hashes
  of its earlier, shorter versions: their rows are the grown shard's first rows, byte for byte).
* `finalize()` gathers the sidecars into the manifest: `shards` (file, sha256, bytes in row order) and
  `content`, one digest of them: the fingerprint of the folder's data.
* A later stage records its parent's fingerprint (`parent_content`: the digest and the shard hashes it read).
  Joining, materializing or continuing it compares manifests only (nothing is re-hashed): the parent may grow
  (its old shards unchanged, or grown from the recorded ones), anything else is a one-line error.
* `popyou verify` re-hashes on demand (verify.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

from popyou_cli.core.errors import PopyouError

SIDECAR_SUFFIX = ".sha256"
DAMAGED_SUFFIX = ".damaged"  # a shard set aside by `popyou verify` (hidden, ignored, removed by finalize)
_NAME_RE = re.compile(r"^shard-(\d+)-(\d+)-(\d+)\.arrow$")


def shard_range(name: str) -> tuple[int, int, int]:
    """(shard id, first row, end row) of a shard file name."""
    k, start, stop = map(int, _NAME_RE.match(name).groups())
    return k, start, stop


def sidecar(folder: Path, name: str) -> Path:
    return folder / f".{name}{SIDECAR_SUFFIX}"


class HashingWriter:
    """A binary file that hashes what is written through it (pyarrow writes Python file objects)."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.bytes += view.nbytes
        return self.f.write(view)

    def flush(self) -> None:
        self.f.flush()

    def tell(self) -> int:
        return self.bytes

    @property
    def closed(self) -> bool:
        return self.f.closed


def hash_file(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in 8 MiB blocks."""
    from popyou_cli.core.files import open_regular

    sha, size = hashlib.sha256(), 0
    with open_regular(path, "shard file") as f:  # a named pipe would never end
        while block := f.read(1 << 23):
            sha.update(block)
            size += len(block)
    return sha.hexdigest(), size


def read_sidecar(folder: Path, name: str) -> dict | None:
    """The shard's sidecar, or None when it is missing or not one popyou wrote (then the shard is hashed)."""
    from popyou_cli.core.files import read_regular

    try:
        side = json.loads(read_regular(sidecar(folder, name), "sidecar", 1 << 20))
    except (OSError, ValueError, PopyouError):
        return None
    ok = isinstance(side, dict) and isinstance(side.get("sha256"), str) and isinstance(side.get("bytes"), int) \
        and isinstance(side.get("prefixes", []), list)
    return side if ok else None


def shard_is_sound(folder: Path, name: str) -> bool:
    """Cheap checks of a committed shard, done on every rerun: its size is the size it was written with, and
    its `index` column holds exactly the rows its name says (a shard copied over another one fails this).
    Bytes changed in place (same size, right rows) are found only by `popyou verify`."""
    side = read_sidecar(folder, name)
    path = folder / name
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # memory-mapping a named pipe would block
            return False
        if side is not None and path.stat().st_size != side.get("bytes"):
            return False
        _, start, stop = shard_range(name)
        with pa.memory_map(str(path)) as src:
            index = pa.ipc.open_stream(src).read_all().column("index")
        return len(index) == stop - start and (len(index) == 0 or (
            index[0].as_py() == start and index[-1].as_py() == stop - 1))
    except (OSError, pa.ArrowException, KeyError):
        return False


def shard_entries(folder: Path, names: list[str]) -> list[dict]:
    """The manifest's `shards` list for the committed shard files `names`: from the sidecars written at commit.
    A shard without a sidecar (written by an older popyou) is hashed now, once."""
    entries = []
    for name in names:
        side = read_sidecar(folder, name)
        size = (folder / name).stat().st_size
        if side is None:
            sha, size = hash_file(folder / name)
            side = {"sha256": sha, "bytes": size}
        elif side.get("bytes") != size:
            raise PopyouError(f"{folder}: shard {name} is damaged (its size changed after it was written); "
                              f"rerun 'popyou verify {folder}', then the command that made the folder")
        entry = {"file": name, "sha256": side["sha256"], "bytes": side["bytes"]}
        if side.get("prefixes"):
            entry["prefixes"] = side["prefixes"]
        entries.append(entry)
    return entries


def content_digest(entries: list[dict]) -> str:
    """One digest of a folder's shards: equal digests mean equal data (same files, same bytes)."""
    return hashlib.sha256("".join(f"{e['file']} {e['sha256']}\n" for e in entries).encode()).hexdigest()


def parent_record(parent_manifest: dict | None, n_rows: int) -> dict | None:
    """What a child records of its parent: the digest and the hashes of the shards holding its rows [0, n_rows).
    None for a parent without content hashes (a plain datasets folder, or one made by an older popyou)."""
    if not parent_manifest or not parent_manifest.get("content"):
        return None
    shards = [[e["file"], e["sha256"]] for e in parent_manifest["shards"] if shard_range(e["file"])[1] < n_rows]
    return {"digest": parent_manifest["content"], "shards": shards}


def lineage_problem(record: dict | None, parent_manifest: dict | None) -> str | None:
    """None when the parent still holds the rows the child was made from, else which rows changed. Only
    manifests are compared. A parent that grew is fine: its old shards are unchanged, or grown from them."""
    if not record:
        return None  # nothing was recorded: the parent had no content hashes to record
    if not parent_manifest or not parent_manifest.get("content"):
        return "it no longer records the content the child was made from"
    if parent_manifest["content"] == record["digest"]:
        return None
    now = {shard_range(e["file"])[0]: e for e in parent_manifest.get("shards", [])}
    for name, sha in record["shards"]:
        k, start, stop = shard_range(name)
        e = now.get(k)
        if e is not None and ((e["file"] == name and e["sha256"] == sha) or (
                shard_range(e["file"])[2] >= stop and sha in e.get("prefixes", []))):
            continue
        return f"its rows {start}..{stop - 1} changed"
    return None


def check_lineage(child: Path, child_manifest: dict | None, parent: Path, parent_manifest: dict | None) -> None:
    """A one-line error naming both folders and the fix when `parent` no longer holds what `child` was made from."""
    problem = lineage_problem((child_manifest or {}).get("parent_content"), parent_manifest)
    if problem:
        stage = (child_manifest or {}).get("stage", "the stage that made it")
        raise PopyouError(f"{child} was made from another version of {parent} ({problem} since); remake it with "
                          f"'popyou {stage}' on {parent} with --overwrite --out {child}, or restore {parent}")


PATH_SETTINGS = ("model", "vqvae", "siglip_model", "siglip_pretrained")  # settings that may name local files


def portable_settings(settings: dict, out_dir: Path) -> dict:
    """`settings` with each local file or folder they name written relative to the stage folder: manifests are
    copied and uploaded with the data, where an absolute path would leak and break. Readers resolve such a path
    against the folder (files.resolve_recorded); Hub ids and "tiny" are kept as they are."""
    from popyou_cli.core.files import portable_path

    out = dict(settings)
    for key in PATH_SETTINGS:
        value = out.get(key)
        if isinstance(value, str) and value and value != "tiny" and os.path.exists(os.path.expanduser(value)):
            out[key] = portable_path(value, out_dir)
    return out
