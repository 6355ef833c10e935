"""The names in a stage folder (see __init__.py), and its manifest (`popyou_stage.json`), checked against its
schema before anything is sized by it.

A manifest is data from disk like any other: copied, edited, or made by someone else. Every field is checked for
its type and range, and the fields against each other (n_rows, shard_size and the shard list agree), before a
count in it sizes a list, a loop or a read: a manifest claiming 10^9 rows in shards of one row is refused in
one line, not planned. Each violation is one line naming the file and the field.
"""
from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popyou_cli.core.bounds import MAX_ROWS, MAX_SHARDS
from popyou_cli.core.errors import PopyouError
from popyou_cli.core.files import read_regular

MANIFEST = "popyou_stage.json"
STATE, INFO = "state.json", "dataset_info.json"  # the names datasets.load_from_disk reads
INDEX = "index"
# Written before --overwrite deletes anything, removed once the new manifest is in: a folder that holds it is
# popyou's, half emptied by a killed replacement, and the next run finishes the job.
REPLACING = ".popyou-replacing"
SHARD_RE = re.compile(r"^shard-(\d+)-(\d+)-(\d+)\.arrow$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_MANIFEST_BYTES = 256 << 20  # a manifest of 10^6 shards is about 150 MB


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """One unit of work: produce rows [start, stop) of shard `shard_id`.

    `shard_start < start` when an earlier, smaller n left this shard short: its rows [shard_start, start)
    are kept from `prefix_file` and only the missing rows are produced."""
    shard_id: int
    start: int
    stop: int
    shard_start: int
    prefix_file: str | None = None

    @property
    def rows(self) -> range:
        return range(self.start, self.stop)


def shard_name(k: int, start: int, stop: int) -> str:
    return f"shard-{k:05d}-{start:09d}-{stop:09d}.arrow"


def shard_names(n_rows: int, shard_size: int) -> list[str]:
    """The file names of a finished folder with n_rows rows, in row order."""
    return [shard_name(k, k * shard_size, min((k + 1) * shard_size, n_rows))
            for k in range(-(-n_rows // shard_size))]


class _Schema:
    """Checks of one manifest file; `bad` raises the one-line error naming the file and the field."""

    def __init__(self, path: Path, m: Any):
        self.path, self.m = path, m

    def bad(self, field: str, want: str, got: Any = None) -> None:
        shown = json.dumps(got)[:60] if got is not None else "nothing"
        raise PopyouError(f"{self.path}: '{field}' {want} (got {shown}); the manifest is damaged or not popyou's: "
                          "remake the folder with the command that made it, or restore the file")

    def integer(self, field: str, low: int, high: int, value: Any = None) -> int:
        value = self.m.get(field) if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.bad(field, f"must be a whole number in {low}..{high:_}", value)
        return value

    def text(self, field: str, value: Any, *, optional: bool = False, pattern: re.Pattern | None = None) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str) or not value or len(value) > 4096 or (pattern and not pattern.match(value)):
            self.bad(field, "must be " + ("a shard file name" if pattern is SHARD_RE else "a sha256 hex digest"
                                          if pattern is _HEX64 else "a text"), value)

    def check(self) -> dict:
        m = self.m
        if not isinstance(m, dict):
            raise PopyouError(f"{self.path}: not a JSON object; the manifest is damaged or not popyou's")
        self.text("stage", m.get("stage"))
        for field in ("parent", "parent_abs", "popyou_version"):
            self.text(field, m.get(field), optional=True)
        for field in ("settings", "features"):
            if not isinstance(m.get(field), dict):
                self.bad(field, "must be a JSON object", m.get(field))
        n, size = self.integer("n_rows", 1, MAX_ROWS), self.integer("shard_size", 1, MAX_ROWS)
        if -(-n // size) > MAX_SHARDS:
            self.bad("n_rows", f"in shards of {size} rows must make at most {MAX_SHARDS:_} shard files", n)
        if "shards" in m or "content" in m:
            self._shards(n, size)
        if m.get("parent_content") is not None:
            self._parent_content(m["parent_content"])
        return m

    def _shards(self, n: int, size: int) -> None:
        shards = self.m.get("shards")
        if not isinstance(shards, list) or not all(isinstance(e, dict) for e in shards):
            self.bad("shards", "must be a list of {file, sha256, bytes}", shards)
        if [e.get("file") for e in shards] != shard_names(n, size):
            self.bad("shards", f"must list the {-(-n // size)} shard files of n_rows {n} in shards of {size}",
                     f"{len(shards)} entries")
        for e in shards:
            self.text("shards.sha256", e.get("sha256"), pattern=_HEX64)
            self.integer("shards.bytes", 0, 1 << 50, e.get("bytes"))
            prefixes = e.get("prefixes", [])
            if not isinstance(prefixes, list) or len(prefixes) > 64:
                self.bad("shards.prefixes", "must be a list of sha256 digests", prefixes)
            for p in prefixes:
                self.text("shards.prefixes", p, pattern=_HEX64)
        self.text("content", self.m.get("content"), pattern=_HEX64)

    def _parent_content(self, record: Any) -> None:
        if not isinstance(record, dict) or not isinstance(record.get("shards"), list):
            self.bad("parent_content", "must be {digest, shards}", record)
        self.text("parent_content.digest", record.get("digest"), pattern=_HEX64)
        if len(record["shards"]) > MAX_SHARDS:
            self.bad("parent_content.shards", f"must list at most {MAX_SHARDS:_} shards", len(record["shards"]))
        for entry in record["shards"]:
            if not isinstance(entry, list) or len(entry) != 2:
                self.bad("parent_content.shards", "must hold [file, sha256] pairs", entry)
            self.text("parent_content.shards", entry[0], pattern=SHARD_RE)
            self.text("parent_content.shards", entry[1], pattern=_HEX64)


def check_manifest(manifest: Any, path: str | os.PathLike) -> dict:
    """`manifest` (as read from `path`) when it fits the schema, else a one-line PopyouError."""
    return _Schema(Path(path), manifest).check()


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The folder's popyou manifest, checked (check_manifest), or None for a folder popyou did not write."""
    p = Path(path) / MANIFEST
    if not p.is_file():
        return None
    try:
        manifest = json.loads(read_regular(p, "manifest", MAX_MANIFEST_BYTES))
    except (OSError, ValueError) as e:
        raise PopyouError(f"cannot read {p}: {e}") from None
    return check_manifest(manifest, p)


def _is_complete(folder: Path, n_rows: int, shard_size: int) -> bool:
    """True when state.json lists exactly the shards of n_rows rows (finalize ran for this n) and no replacement
    (--overwrite) was interrupted there."""
    if is_being_replaced(folder):
        return False
    try:
        state = json.loads(read_regular(folder / STATE, "dataset state", 256 << 20))
        files = state["_data_files"]
        return [d.get("filename") for d in files] == shard_names(n_rows, shard_size)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, PopyouError):
        return False


def is_being_replaced(folder: Path) -> bool:
    """True when an --overwrite of `folder` was interrupted (its REPLACING mark is there, as a regular file)."""
    try:
        return stat.S_ISREG(os.lstat(Path(folder) / REPLACING).st_mode)
    except OSError:
        return False


def _dataset_info(features) -> dict:
    """dataset_info.json as `save_to_disk` writes it, through datasets' public writer (keys sorted)."""
    import datasets

    with tempfile.TemporaryDirectory(prefix="popyou-info-") as tmp:
        datasets.DatasetInfo(features=features).write_to_directory(tmp)
        info = json.loads((Path(tmp) / INFO).read_text(encoding="utf-8"))
    return {k: info[k] for k in sorted(info)}
