"""`popyou verify DIR`: re-hash a stage folder and its ancestors, report damaged and missing shards, and set the
damaged ones aside so that rerunning the stage that made the folder remakes exactly them.

A shard is damaged when its bytes no longer hash to what was recorded when it was committed (bit rot, a copy
over it, a truncation), or when its rows are not the ones its name says. Setting it aside renames it to a
hidden `.NAME.damaged` (under the folder's lock): readers then report it missing, the producing stage's rerun
sees it as not made yet, and its `finalize()` deletes the set-aside file.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from popyou_cli.core.errors import PopyouError
from popyou_cli.core.locks import FolderLock

from popyou_cli.store.folder import _ancestors, _parent_of
from popyou_cli.store.layout import MANIFEST, _is_complete, is_being_replaced, read_manifest, shard_names as _shard_names
from popyou_cli.store.lineage import DAMAGED_SUFFIX, hash_file, lineage_problem, shard_is_sound, shard_range

MAX_LISTED = 20  # shard lines per folder and kind; the rest are counted

@dataclass
class FolderReport:
    folder: Path
    stage: str | None
    shards: int = 0
    damaged: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # other findings: unfinished, stale lineage, no hashes
    set_aside: bool = False

    @property
    def ok(self) -> bool:
        return not (self.damaged or self.missing or self.notes)

    def lines(self) -> list[str]:
        head = f"{self.folder} ({self.stage or 'not a popyou stage folder'})"
        if self.ok:
            return [f"{head}: {self.shards} shards, all as written" if self.stage else
                    f"{head}: no hashes recorded, nothing to check against"]
        out = []
        for names, what in ((self.damaged, "damaged" + (", set aside" if self.set_aside else "")),
                            (self.missing, "missing")):
            for name in names[:MAX_LISTED]:
                _, start, stop = shard_range(name)
                out.append(f"{head}: shard {name} (rows {start}..{stop - 1}) {what}")
            if len(names) > MAX_LISTED:
                out.append(f"{head}: and {len(names) - MAX_LISTED} more shards {what}")
        return out + [f"{head}: {note}" for note in self.notes]


def _check_folder(folder: Path, manifest: dict) -> FolderReport:
    """The folder's shards against its (schema-checked) manifest: every name, file type, size, rows and hash."""
    rep = FolderReport(folder, manifest.get("stage"))
    n, size = manifest["n_rows"], manifest["shard_size"]
    names = _shard_names(n, size)
    rep.shards = len(names)
    if not _is_complete(folder, n, size):
        rep.notes.append(f"unfinished; rerun 'popyou {rep.stage}' on it to finish")
    recorded = {e["file"]: e for e in manifest.get("shards", [])}
    if not recorded:
        rep.notes.append("no content hashes recorded (made by an older popyou): only files and rows checked")
    for name in names:
        path = folder / name
        if not path.exists():
            rep.missing.append(name)
        elif not stat.S_ISREG(path.stat().st_mode):  # a named pipe or device is no shard (and would block)
            rep.damaged.append(name)
        elif not shard_is_sound(folder, name) or (
                name in recorded and hash_file(path) != (recorded[name]["sha256"], recorded[name]["bytes"])):
            rep.damaged.append(name)
    return rep


def verify(path: str | os.PathLike, *, set_aside: bool = True) -> list[FolderReport]:
    """One report per folder: `path` first, then its parents. Damaged shards are renamed out of the way when
    set_aside (and the folder is not being written by another process)."""
    path = Path(path)
    if not path.is_dir():
        raise PopyouError(f"{path} is not a folder")
    if read_manifest(path) is None and not is_being_replaced(path):
        raise PopyouError(f"{path} is not a popyou stage folder (it has no {MANIFEST}): verify checks the folders "
                          "that gen-data, caption and encode make, and their parents")
    reports = []
    for folder in _ancestors(path):
        if is_being_replaced(folder):
            rep = FolderReport(folder, "being replaced")
            rep.notes.append("an --overwrite of it was interrupted: its old shards are partly deleted; rerun the "
                             "command that made it to finish")
            reports.append(rep)
            continue
        manifest = read_manifest(folder) if folder.is_dir() else None
        if manifest is None:
            rep = FolderReport(folder, None)
            if not folder.is_dir():
                rep.notes.append("the parent folder is gone")
            reports.append(rep)
            continue
        rep = _check_folder(folder, manifest)
        parent = _parent_of(folder, manifest)
        if parent is not None and parent.is_dir():
            problem = lineage_problem(manifest.get("parent_content"), read_manifest(parent))
            if problem:
                rep.notes.append(f"made from another version of {parent} ({problem} since); remake it with "
                                 f"'popyou {rep.stage}' and --overwrite")
        if rep.damaged and set_aside:
            try:
                with FolderLock(folder, command="popyou verify"):
                    for name in rep.damaged:  # a rename replaces a link at the new name, never writes through it
                        os.replace(folder / name, folder / f".{name}{DAMAGED_SUFFIX}")
                rep.set_aside = True
            except PopyouError as e:
                rep.notes.append(f"damaged shards not set aside: {e}")
        reports.append(rep)
    return reports


def summary(reports: list[FolderReport]) -> str:
    """The last line: what to do next."""
    bad = [r for r in reports if not r.ok]
    if not bad:
        plain = sum(r.stage is None for r in reports)
        return (f"verify: {len(reports) - plain} popyou folder(s), every shard as written" +
                (f"; {plain} plain dataset folder(s) without hashes not checked" if plain else ""))
    redo = [r for r in bad if r.damaged or r.missing]
    fix = "; ".join(f"rerun 'popyou {r.stage}' with its options on {r.folder}" for r in redo if r.stage)
    return f"verify: problems in {len(bad)} of {len(reports)} folder(s)" + (f"; to remake the shards: {fix}"
                                                                             if fix else "")
