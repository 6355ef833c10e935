"""Stage folders and their parents, `check_can_replace` (the one rule for what --overwrite may delete, for every
command that replaces a folder) and `StageWriter`, which writes a stage folder (see __init__.py)."""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import datasets
import numpy as np
import pyarrow as pa

from popyou_cli.core.version import __version__
from popyou_cli.core.errors import PopyouError
from popyou_cli.core.files import (TMP_SUFFIX, atomic_write, atomic_write_json, ensure_writable_dir, fsync_dir, remove,
                              sweep_temporaries, temporary_name)
from popyou_cli.core.locks import LOCK_FILE, FolderLock

from popyou_cli.store.lineage import (DAMAGED_SUFFIX, SIDECAR_SUFFIX, HashingWriter, content_digest, lineage_problem,
                      parent_record, portable_settings, read_sidecar, shard_entries, shard_is_sound, sidecar)
from popyou_cli.store.layout import (INDEX, INFO, MANIFEST, REPLACING, SHARD_RE as _SHARD_RE, STATE, ShardSpec,
                     _dataset_info, _is_complete, is_being_replaced, read_manifest, shard_name as _shard_name,
                     shard_names as _shard_names)


def _norm(obj: Any) -> Any:
    # Compare settings as they look after a JSON round trip (tuples become lists, Paths become strings).
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _parent_of(folder: Path, manifest: dict | None) -> Path | None:
    """The parent folder a manifest names, relative to the folder (manifests written before 0.2 also kept an
    absolute path, used when the relative one is gone)."""
    if not manifest or not manifest.get("parent"):
        return None
    rel = Path(os.path.normpath(folder / manifest["parent"]))  # written by os.path.relpath: lexical, like this
    if rel.exists() or not manifest.get("parent_abs"):
        return rel
    return Path(manifest["parent_abs"])


def _ancestors(path: Path) -> list[Path]:
    """`path` and every parent folder its manifests name."""
    chain, seen = [], set()
    p: Path | None = path
    while p is not None and os.path.realpath(p) not in seen:
        seen.add(os.path.realpath(p))
        chain.append(p)
        p = _parent_of(p, read_manifest(p)) if p.is_dir() else None
    return chain


def check_not_same(inputs: str | os.PathLike | Iterable[str | os.PathLike], out: str | os.PathLike) -> None:
    """Refuse an output folder equal to, inside, or containing an input folder or one of its parents
    (writing or wiping it would destroy data the stage reads)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    o = Path(os.path.realpath(out))
    for inp in inputs:
        for a in _ancestors(Path(inp)):
            r = Path(os.path.realpath(a))
            if o == r or r in o.parents or o in r.parents:
                raise PopyouError(f"output folder {out} overlaps input folder {a}; choose another output folder")


def _visible_entries(folder: Path) -> list[Path]:
    return [c for c in folder.iterdir() if not c.name.startswith(".")] if folder.is_dir() else []


def _holds_or_is(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_can_replace(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *,
                      made_by: Iterable[str] = (MANIFEST,), what: str = "output folder") -> None:
    """The one rule for deleting what a folder holds (--overwrite), for every command that replaces a folder:
    a one-line PopyouError unless `out`
    * is not the file system root, the home folder or a folder holding it, nor a folder holding the current one;
    * neither is, holds nor lies inside an input of the run, or a folder its manifests name (check_not_same);
    * is empty or missing, or was made by popyou: it holds one of `made_by` (the record popyou writes there: a
      stage manifest, a pipeline.json...) as a regular file, or the mark of an interrupted replacement."""
    o = Path(os.path.realpath(out))
    try:
        home = Path(os.path.realpath(Path.home()))
    except RuntimeError:  # no HOME and no password entry: nothing to protect under that name
        home = Path("/nonexistent-home")
    if len(o.parts) < 2 or _holds_or_is(o, home) or o in Path(os.path.realpath(os.getcwd())).parents:
        where = "the root folder" if len(o.parts) < 2 else "your home folder" if o == home else (
            "a folder holding your home folder" if _holds_or_is(o, home) else "a folder holding the current folder")
        raise PopyouError(f"refusing to replace {what} {out}: it is {where}; choose a new folder for --out")
    check_not_same(list(inputs), out)
    if not o.is_dir() or not _visible_entries(o) or is_being_replaced(o):
        return
    if not any(stat.S_ISREG(os.lstat(p).st_mode) for p in (o / name for name in made_by) if os.path.lexists(p)):
        raise PopyouError(f"refusing to replace {what} {out}: it is not empty and popyou did not make it (no "
                          f"{' or '.join(made_by)} in it); choose an empty or new folder")


def _wipe(folder: Path) -> None:
    """Empty a popyou folder (check_can_replace first) so that a kill at any moment leaves it resumable: the
    REPLACING mark is written before anything is deleted, and removed by the caller once the new manifest is in.
    The folder itself stays (it may be a mount point or have permissions the user set), and so does the lock
    file: another writer would otherwise create a new one and lock it while this run still works here."""
    atomic_write(folder / REPLACING, "an --overwrite of this folder was interrupted; rerun it to finish\n")
    for c in folder.iterdir():
        if c.name not in (LOCK_FILE, REPLACING):
            remove(c)  # a link is removed, never followed


def _sweep(folder: Path) -> None:
    """Under the folder's lock: the temporary files a killed run left (every one is an orphan while the lock is
    ours) and the hash sidecars of shards that never appeared (written just before a shard's rename)."""
    sweep_temporaries(folder)
    names = set(os.listdir(folder))
    for name in names:
        if name.startswith(".shard-") and name.endswith(SIDECAR_SUFFIX) and name[1:-len(SIDECAR_SUFFIX)] not in names:
            remove(folder / name)


class StageWriter:
    """Writes one stage's output folder in shards; see the module docstring."""

    def __init__(self, out_dir: str | os.PathLike, *, stage: str, parent: str | os.PathLike | None,
                 settings: dict, features: datasets.Features, n_rows: int, shard_size: int,
                 overwrite: bool = False, main_process: bool = True, row_bytes: int | None = None):
        """row_bytes: an upper estimate of one row's size on disk; the rows still to make must fit in the free
        space, else a one-line error before any work. The main process locks the folder (locks.py) until
        `release()`; the other processes of a launch work under its lock."""
        if n_rows < 1:
            raise PopyouError(f"{stage}: the number of rows must be at least 1 (got {n_rows})")
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        from popyou_cli.core.bounds import MAX_SHARDS

        if -(-n_rows // shard_size) > MAX_SHARDS:  # plans of work and state.json list every shard
            raise PopyouError(f"{stage}: {n_rows} rows in shards of {shard_size} would make more than {MAX_SHARDS} "
                              f"shard files; raise --shard-size to at least {-(-n_rows // MAX_SHARDS)}")
        if INDEX in features and features[INDEX] != datasets.Value("int64"):
            raise ValueError("the 'index' column must be Value('int64')")
        # `index` first, so every stage folder starts with the key that joins it to its parents.
        self.features = datasets.Features({INDEX: datasets.Value("int64"),
                                           **{k: v for k, v in features.items() if k != INDEX}})
        self.out_dir, self.stage = Path(out_dir), stage
        self.n_rows, self.shard_size = n_rows, shard_size
        self.num_shards = -(-n_rows // shard_size)
        self.manifest = {
            "stage": stage,
            "parent": os.path.relpath(parent, self.out_dir) if parent is not None else None,
            "settings": _norm(portable_settings(settings, self.out_dir)),
            "features": _norm(self.features.to_dict()),
            "n_rows": n_rows, "shard_size": shard_size, "popyou_version": __version__,
        }
        self._parent = Path(parent) if parent is not None else None
        self._lock: FolderLock | None = None
        if main_process:
            self._prepare(overwrite, row_bytes)
        else:
            old = read_manifest(self.out_dir)
            if old is None or self._differences(old) or old["n_rows"] != n_rows:
                raise PopyouError(f"{self.out_dir}: manifest missing or different on a non-main process; "
                                  "build the main process's StageWriter first")

    def _differences(self, old: dict, parent_manifest: dict | None = None) -> list[str]:
        """Human-readable differences between the folder's run and this one (n_rows may differ). The parent is
        the same when it is the same folder, or when it holds the content the folder was made from (folders
        copied or moved apart: the manifest records the parent relative to the folder)."""
        def real(p: Path | None) -> str | None:  # parents compare as resolved folders, not spellings
            return os.path.realpath(p) if p is not None else None

        same_content = bool(old.get("parent_content")) and parent_manifest is not None and \
            lineage_problem(old["parent_content"], parent_manifest) is None
        o = {**old.get("settings", {}), "stage": old.get("stage"), "shard_size": old.get("shard_size"),
             "parent": None if same_content else real(_parent_of(self.out_dir, old))}
        n = {**self.manifest["settings"], "stage": self.stage, "shard_size": self.shard_size,
             "parent": None if same_content else real(self._parent)}
        diffs = [f"{k} {str(n.get(k))[:60]} (folder has {str(o.get(k))[:60]})"
                 for k in sorted(set(o) | set(n)) if o.get(k) != n.get(k)]
        if old.get("features") != self.manifest["features"]:
            diffs.append("columns or column types differ")
        return diffs

    def _foreign(self) -> bool:
        return read_manifest(self.out_dir) is None and bool(_visible_entries(self.out_dir)) and \
            not is_being_replaced(self.out_dir)

    def _foreign_error(self) -> PopyouError:
        # Never wipe a folder popyou did not make, even with overwrite: a typo could cost a home folder.
        return PopyouError(f"output folder {self.out_dir} is not empty and is not a popyou {self.stage} folder; "
                           "choose an empty or new folder")

    def _prepare(self, overwrite: bool, row_bytes: int | None) -> None:
        if self._parent is not None:
            check_not_same(self._parent, self.out_dir)
        ensure_writable_dir(self.out_dir)
        if self._foreign():  # checked before the lock, so that no lock file is left in someone else's folder
            raise self._foreign_error()
        self._lock = FolderLock(self.out_dir, command=f"popyou {self.stage}")
        try:
            self._prepare_locked(overwrite, row_bytes)
        except BaseException:
            self.release()
            raise

    def _prepare_locked(self, overwrite: bool, row_bytes: int | None) -> None:
        replacing = is_being_replaced(self.out_dir)
        old = None if replacing else read_manifest(self.out_dir)
        if old is None and not replacing and _visible_entries(self.out_dir):  # filled by someone else meanwhile
            raise self._foreign_error()
        _sweep(self.out_dir)
        parent_manifest = read_manifest(self._parent) if self._parent is not None else None
        record = parent_record(parent_manifest, self.n_rows)
        if record is not None:
            self.manifest["parent_content"] = record
        if replacing or (old is not None and (overwrite or not self._scan() and not (self.out_dir / STATE).exists())):
            # --overwrite, a killed --overwrite, or a run that wrote no row yet: nothing to lose, nothing to keep
            check_can_replace(self.out_dir, [self._parent] if self._parent is not None else [])
            _wipe(self.out_dir)
            old = None
        elif old is not None:
            diffs = self._differences(old, parent_manifest)
            if diffs:
                raise PopyouError(f"output folder {self.out_dir} holds a different run ({'; '.join(diffs)}); "
                                  "pass --overwrite to replace it, or choose another folder")
            problem = lineage_problem(old.get("parent_content"), parent_manifest)
            if problem:
                raise PopyouError(f"output folder {self.out_dir} was made from another version of {self._parent} "
                                  f"({problem} since); pass --overwrite to remake it from the current one")
            if self.n_rows < old["n_rows"]:
                raise PopyouError(f"output folder {self.out_dir} holds {old['n_rows']} rows, more than the "
                                  f"{self.n_rows} asked for; pass --overwrite to replace it, or choose another folder")
            if old["n_rows"] == self.n_rows and old.get("parent_content") == record and \
                    old.get("parent") == self.manifest["parent"]:
                self.manifest = old  # the same run: keep its record (content hashes, version that made it)
        if row_bytes:
            self._check_space(row_bytes)
        if self.manifest is not old:
            atomic_write_json(self.out_dir / MANIFEST, self.manifest)
        remove(self.out_dir / REPLACING)  # the new manifest is in: the folder is this run's now

    def _check_space(self, row_bytes: int) -> None:
        rows = sum(len(s.rows) for s in self.pending_shards())
        need, free = rows * row_bytes, shutil.disk_usage(self.out_dir).free
        if need > free:
            raise PopyouError(f"{self.stage}: the {rows} rows still to make need up to {need / 2**30:.2f} GiB, but "
                              f"{self.out_dir} has {free / 2**30:.2f} GiB free; free some space, lower --n or "
                              "choose another --out")

    def release(self) -> None:
        """Unlock the folder (the main process's writer holds the lock from its creation)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _expected(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, self.n_rows)

    def _scan(self, check: bool = False) -> dict[int, list[tuple[int, str]]]:
        """Committed shard files by shard id: [(stop, file name)], longest first. Temporary files do not
        match the pattern, so a half-written shard is invisible. check: leave out shards that fail the cheap
        soundness checks (lineage.shard_is_sound): they are made again."""
        found: dict[int, list[tuple[int, str]]] = {}
        for name in os.listdir(self.out_dir):
            m = _SHARD_RE.match(name)
            if m:
                k, start, stop = map(int, m.groups())
                if start == k * self.shard_size and start < stop and (not check or shard_is_sound(self.out_dir, name)):
                    found.setdefault(k, []).append((stop, name))
        return {k: sorted(v, reverse=True) for k, v in found.items()}

    def pending_shards(self, rank: int = 0, world_size: int = 1) -> list[ShardSpec]:
        """This process's unfinished shards. Shards go to ranks by shard id (k % world_size == rank), not by
        position in the pending list: each process scans at its own moment, and a split by shard id stays
        disjoint whatever the others have finished meanwhile."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        found, specs = self._scan(check=True), []
        for k in range(rank, self.num_shards, world_size):
            start, stop = self._expected(k)
            best = next(((s, name) for s, name in found.get(k, []) if s <= stop), None)
            if best is None:
                specs.append(ShardSpec(k, start, stop, start))
            elif best[0] < stop:  # short shard from a smaller n: keep its rows, produce the rest
                specs.append(ShardSpec(k, best[0], stop, start, best[1]))
        return specs

    def _as_table(self, spec: ShardSpec, data: Any) -> pa.Table:
        if isinstance(data, datasets.Dataset):
            table = data.with_format("arrow")[:]  # honours select()/shuffle() indices
        elif isinstance(data, pa.Table):
            table = data
        else:
            if isinstance(data, list):  # rows -> columns
                data = {c: [r[c] for r in data] for c in (data[0] if data else self.features)}
            data = dict(data)
            data.setdefault(INDEX, np.arange(spec.start, spec.stop, dtype=np.int64))
            missing, extra = set(self.features) - set(data), set(data) - set(self.features)
            if missing or extra:
                raise ValueError(f"shard columns differ from the features: missing {missing}, extra {extra}")
            # from_dict encodes PIL images, numpy arrays, etc. exactly as datasets does everywhere else.
            table = datasets.Dataset.from_dict(data, features=self.features).data.table
        if INDEX not in table.column_names:
            table = table.append_column(INDEX, pa.array(np.arange(spec.start, spec.stop, dtype=np.int64)))
        return table.select(list(self.features)).cast(self.features.arrow_schema)

    def write_shard(self, spec: ShardSpec, data: Any) -> Path:
        """Write rows [spec.start, spec.stop): a dict of columns, a list of row dicts, a pyarrow Table or a
        Dataset; `index` is added when absent and checked when present. The shard appears under its final
        name only once fully written and fsynced."""
        table = self._as_table(spec, data)
        if table.num_rows != spec.stop - spec.start:
            raise ValueError(f"shard {spec.shard_id}: got {table.num_rows} rows, expected {spec.stop - spec.start}")
        if not np.array_equal(table.column(INDEX).to_numpy(), np.arange(spec.start, spec.stop)):
            raise ValueError(f"shard {spec.shard_id}: 'index' is not rows {spec.start}..{spec.stop - 1} in order")
        if spec.prefix_file is not None:
            with pa.memory_map(str(self.out_dir / spec.prefix_file)) as src:
                prefix = pa.ipc.open_stream(src).read_all()
            # One chunk, as a shard written whole is: a grown shard then has the bytes (and hash) of that one.
            table = pa.concat_tables([prefix.cast(table.schema), table]).combine_chunks()

        hashed: list[HashingWriter] = []

        def write(f: BinaryIO) -> None:  # an Arrow IPC stream, as save_to_disk writes, hashed on the way
            hashed.append(HashingWriter(f))
            with pa.ipc.new_stream(hashed[0], table.schema) as w:
                w.write_table(table, max_chunksize=1000)

        name = _shard_name(spec.shard_id, spec.shard_start, spec.stop)
        tmp = temporary_name(self.out_dir / name)
        atomic_write(tmp, write)  # the bytes first, under a hidden name: hashing needs them complete
        side = {"sha256": hashed[0].sha.hexdigest(), "bytes": hashed[0].bytes}
        if spec.prefix_file is not None:  # its first rows are the short shard's: children made from it still fit
            old = read_sidecar(self.out_dir, spec.prefix_file) or {}
            side["prefixes"] = old.get("prefixes", []) + ([old["sha256"]] if "sha256" in old else [])
        # The sidecar before the shard: a committed shard always has its hash (a stale sidecar of a shard that
        # never appeared is overwritten when the shard is made).
        atomic_write_json(sidecar(self.out_dir, name), side)
        # The short file a grown shard replaces stays until finalize(): the last state.json may still list it.
        os.replace(tmp, self.out_dir / name)
        fsync_dir(self.out_dir)
        return self.out_dir / name

    def is_complete(self) -> bool:
        """True once finalize() has run for the current n_rows."""
        return _is_complete(self.out_dir, self.n_rows, self.shard_size)

    def finalize(self) -> None:
        """Write dataset_info.json and state.json so `datasets.load_from_disk` reads the shards in row order.
        Call on one process after all have finished writing: it also deletes leftovers (temporary files,
        short shards that grew)."""
        names = _shard_names(self.n_rows, self.shard_size)
        present = set(os.listdir(self.out_dir))
        missing = [k for k, name in enumerate(names) if name not in present]
        if missing:
            raise PopyouError(f"{self.out_dir}: {len(missing)} of {len(names)} shards are not written yet "
                              f"(first: {missing[0]}); rerun 'popyou {self.stage}' to finish them")
        entries = shard_entries(self.out_dir, names)
        self.manifest = {**self.manifest, "shards": entries, "content": content_digest(entries)}
        atomic_write_json(self.out_dir / MANIFEST, self.manifest)
        atomic_write_json(self.out_dir / INFO, _dataset_info(self.features))
        # The fingerprint keys datasets' map() cache files, so it changes whenever the content does.
        state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": self.manifest["content"][:16],
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                 "_output_all_columns": False, "_split": None}
        # state.json is written last: it is the commit point that switches readers to the new shard list.
        atomic_write_json(self.out_dir / STATE, state, sort_keys=True)
        keep = set(names) | {sidecar(self.out_dir, n).name for n in names}
        for name in present:
            if (_SHARD_RE.match(name) and name not in keep) or (name.startswith(".") and name not in keep and (
                    name.endswith((TMP_SUFFIX, DAMAGED_SUFFIX, SIDECAR_SUFFIX)))):
                (self.out_dir / name).unlink(missing_ok=True)
