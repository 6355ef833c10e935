"""Datasets on disk for every data stage (gen-data, caption, encode): sharded atomic writes, resume,
manifest, zero-copy joined loading and column checks.

On-disk layout of a stage folder::

    OUT/
      popyou_stage.json               manifest: stage, parent (relative + absolute), settings, features,
                                      n_rows, shard_size, popyou version
      shard-00000-000000000-000001000.arrow   rows [0, 1000): shard id, first row, end row (exclusive)
      shard-00001-000001000-000002000.arrow   Arrow IPC *stream* files, the format `save_to_disk` writes
      .shard-00002-...arrow.<pid>.<hex>.tmp   a shard being written: hidden and ignored until renamed
      dataset_info.json, state.json   written by `finalize()`: `datasets.load_from_disk(OUT)` memory-maps the
                                      shard files above in row order (no copy)

Shard k always holds rows [k*shard_size, (k+1)*shard_size) ∩ [0, n_rows), so shard ids mean the same rows
for every run, every process count and every n. A larger n on a finished folder adds only the missing rows
(a short last shard is extended: `ShardSpec.shard_start < start`); `finalize()` then rewrites state.json.
A stage folder holds `index` plus the stage's new columns; `load_stage` joins it side by side with its
parents' folders, so images are stored once. A rerun with other settings is refused unless overwrite.

API (all user errors raise `PopyouError`, a one-line message):

- `StageWriter(out_dir, *, stage, parent, settings, features, n_rows, shard_size, overwrite=False,
  main_process=True)`: create or check the folder and its manifest.
- `StageWriter.pending_shards(rank=0, world_size=1) -> list[ShardSpec]`: this process's unfinished shards.
- `StageWriter.write_shard(spec, data) -> Path`: write rows [spec.start, spec.stop) atomically.
- `StageWriter.finalize()`: make the folder loadable once every shard exists (main process, after the others).
- `StageWriter.is_complete() -> bool`.
- `load_stage(path) -> datasets.Dataset`: a stage joined with all its parents (zero copy).
- `require_columns(ds, columns, *, for_stage, path=None)`: say which subcommand makes a missing column.
- `materialize(path, out, *, overwrite=False) -> Path`: standalone `save_to_disk` copy of the joined dataset.
- `check_writable(path)`, `check_not_same(inputs, out)`, `read_manifest(path)`, `producer_of(column)`.

Several processes (accelerate): the main process builds its writer first (it may wipe the folder and
writes the manifest), then `accelerator.wait_for_everyone()`, then the others build theirs with
`main_process=False` (they only check the manifest). Each process writes `pending_shards(rank, world_size)`;
after `wait_for_everyone()` the main process calls `finalize()`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import datasets
import numpy as np
import pyarrow as pa
from datasets.table import table_cast
from datasets.utils.py_utils import asdict

from popyou_cli import __version__
from popyou_cli.errors import PopyouError

MANIFEST = "popyou_stage.json"
STATE, INFO = "state.json", "dataset_info.json"  # the names datasets.load_from_disk reads
_SHARD_RE = re.compile(r"^shard-(\d+)-(\d+)-(\d+)\.arrow$")
_TMP_SUFFIX = ".tmp"  # temporary files: a leading "." and this suffix
INDEX = "index"

# Which subcommand makes a column, for the "missing column" message.
PRODUCERS = {"index": "gen-data", "prompt": "gen-data", "seed": "gen-data", "attributes": "gen-data",
             "image": "gen-data", "caption": "caption", "caption_error": "caption", "codes": "encode",
             "encode_error": "encode"}


def producer_of(column: str) -> str | None:
    """The popyou subcommand that makes `column`, or None if none does."""
    if column in PRODUCERS:
        return PRODUCERS[column]
    if column.startswith("siglip") or column.endswith(("_embedding", "_emb")):
        return "encode"  # SigLIP image/text embedding columns, whatever their exact names
    return None


@dataclass(frozen=True)
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


def _shard_name(k: int, start: int, stop: int) -> str:
    return f"shard-{k:05d}-{start:09d}-{stop:09d}.arrow"


def _shard_names(n_rows: int, shard_size: int) -> list[str]:
    """The file names of a finished folder with n_rows rows, in row order."""
    return [_shard_name(k, k * shard_size, min((k + 1) * shard_size, n_rows))
            for k in range(-(-n_rows // shard_size))]


def _is_complete(folder: Path, n_rows: int, shard_size: int) -> bool:
    """True when state.json lists exactly the shards of n_rows rows (finalize ran for this n)."""
    try:
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return [d.get("filename") for d in state.get("_data_files", [])] == _shard_names(n_rows, shard_size)


def _norm(obj: Any) -> Any:
    # Compare settings as they look after a JSON round trip (tuples become lists, Paths become strings).
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _commit(final: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write through `write` into a hidden temporary file beside `final`, fsync, then rename: readers (and
    a rerun) see either nothing or the complete file, never a partial one."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)
    return final


def _commit_json(final: Path, obj: Any, **kw) -> None:
    _commit(final, lambda f: f.write(json.dumps(obj, indent=2, **kw).encode()))


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; some platforms cannot open or fsync a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The folder's popyou manifest, or None for a folder popyou did not write."""
    p = Path(path) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PopyouError(f"cannot read {p}: {e}") from None


def _parent_of(folder: Path, manifest: dict | None) -> Path | None:
    """The parent folder a manifest names: relative first (folders moved together), then absolute."""
    if not manifest or not manifest.get("parent"):
        return None
    rel = folder / manifest["parent"]
    if rel.exists() or not manifest.get("parent_abs"):
        return rel
    return Path(manifest["parent_abs"])


def check_writable(path: str | os.PathLike) -> Path:
    """Create `path` if needed and prove a file can be written in it (before any expensive work)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise PopyouError(f"output folder {p} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".popyou-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise PopyouError(f"cannot write to output folder {p}: {e.strerror or e}") from None
    return p


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


def _wipe(folder: Path) -> None:
    # Empty the folder but keep it: it may be a mount point or have permissions the user set.
    for c in folder.iterdir():
        shutil.rmtree(c) if c.is_dir() and not c.is_symlink() else c.unlink()


class StageWriter:
    """Writes one stage's output folder in shards; see the module docstring."""

    def __init__(self, out_dir: str | os.PathLike, *, stage: str, parent: str | os.PathLike | None,
                 settings: dict, features: datasets.Features, n_rows: int, shard_size: int,
                 overwrite: bool = False, main_process: bool = True):
        if n_rows < 1:
            raise PopyouError(f"{stage}: the number of rows must be at least 1 (got {n_rows})")
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
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
            "parent_abs": os.path.abspath(parent) if parent is not None else None,
            "settings": _norm(settings), "features": _norm(self.features.to_dict()),
            "n_rows": n_rows, "shard_size": shard_size, "popyou_version": __version__,
        }
        self._parent = Path(parent) if parent is not None else None
        if main_process:
            self._prepare(overwrite)
        else:
            old = read_manifest(self.out_dir)
            if old is None or self._differences(old) or old["n_rows"] != n_rows:
                raise PopyouError(f"{self.out_dir}: manifest missing or different on a non-main process; "
                                  "build the main process's StageWriter first")

    def _differences(self, old: dict) -> list[str]:
        """Human-readable differences between the folder's run and this one (n_rows may differ)."""
        def real(p: Path | None) -> str | None:  # parents compare as resolved folders, not spellings
            return os.path.realpath(p) if p is not None else None

        o = {**old.get("settings", {}), "stage": old.get("stage"), "shard_size": old.get("shard_size"),
             "parent": real(_parent_of(self.out_dir, old))}
        n = {**self.manifest["settings"], "stage": self.stage, "shard_size": self.shard_size,
             "parent": real(self._parent)}
        diffs = [f"{k} {str(n.get(k))[:60]} (folder has {str(o.get(k))[:60]})"
                 for k in sorted(set(o) | set(n)) if o.get(k) != n.get(k)]
        if old.get("features") != self.manifest["features"]:
            diffs.append("columns or column types differ")
        return diffs

    def _prepare(self, overwrite: bool) -> None:
        if self._parent is not None:
            check_not_same(self._parent, self.out_dir)
        check_writable(self.out_dir)
        old = read_manifest(self.out_dir)
        if old is None and _visible_entries(self.out_dir):
            # Never wipe a folder popyou did not make, even with overwrite: a typo could cost a home folder.
            raise PopyouError(f"output folder {self.out_dir} is not empty and is not a popyou "
                              f"{self.stage} folder; choose an empty or new folder")
        if old is not None and overwrite:
            _wipe(self.out_dir)
        elif old is not None:
            diffs = self._differences(old)
            if diffs:
                raise PopyouError(f"output folder {self.out_dir} holds a different run ({'; '.join(diffs)}); "
                                  "pass --overwrite to replace it, or choose another folder")
            if self.n_rows < old["n_rows"]:
                raise PopyouError(f"output folder {self.out_dir} holds {old['n_rows']} rows, more than the "
                                  f"{self.n_rows} asked for; pass --overwrite to replace it, or choose another folder")
            if old == self.manifest:
                return
        _commit_json(self.out_dir / MANIFEST, self.manifest)

    def _expected(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, self.n_rows)

    def _scan(self) -> dict[int, list[tuple[int, str]]]:
        """Committed shard files by shard id: [(stop, file name)], longest first. Temporary files do not
        match the pattern, so a half-written shard is invisible."""
        found: dict[int, list[tuple[int, str]]] = {}
        for name in os.listdir(self.out_dir):
            m = _SHARD_RE.match(name)
            if m:
                k, start, stop = map(int, m.groups())
                if start == k * self.shard_size and start < stop:
                    found.setdefault(k, []).append((stop, name))
        return {k: sorted(v, reverse=True) for k, v in found.items()}

    def pending_shards(self, rank: int = 0, world_size: int = 1) -> list[ShardSpec]:
        """This process's unfinished shards. Shards go to ranks by shard id (k % world_size == rank), not by
        position in the pending list: each process scans at its own moment, and a split by shard id stays
        disjoint whatever the others have finished meanwhile."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        found, specs = self._scan(), []
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
        return table_cast(table.select(list(self.features)), self.features.arrow_schema)

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
            table = pa.concat_tables([table_cast(prefix, table.schema), table])

        def write(f: BinaryIO) -> None:  # an Arrow IPC stream, as save_to_disk writes
            with pa.ipc.new_stream(f, table.schema) as w:
                w.write_table(table, max_chunksize=1000)

        # The short file a grown shard replaces stays until finalize(): the last state.json may still list it.
        return _commit(self.out_dir / _shard_name(spec.shard_id, spec.shard_start, spec.stop), write)

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
        # The fingerprint keys datasets' map() cache files, so it must change whenever the content can.
        h = hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode())
        for name in names:
            h.update(f"{name}:{(self.out_dir / name).stat().st_size}".encode())
        info = datasets.DatasetInfo(features=self.features)
        info_dict = asdict(info)  # exactly what save_to_disk writes
        _commit_json(self.out_dir / INFO, {k: info_dict[k] for k in sorted(info_dict)})
        state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": h.hexdigest()[:16],
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                 "_output_all_columns": False, "_split": None}
        # state.json is written last: it is the commit point that switches readers to the new shard list.
        _commit_json(self.out_dir / STATE, state, sort_keys=True)
        keep = set(names)
        for name in present:
            if (_SHARD_RE.match(name) and name not in keep) or (
                    name.startswith(".") and name.endswith(_TMP_SUFFIX)):
                (self.out_dir / name).unlink(missing_ok=True)


def _load_one(path: Path) -> tuple[datasets.Dataset, dict | None]:
    if not path.is_dir():
        raise PopyouError(f"input folder {path} does not exist")
    manifest = read_manifest(path)
    if manifest is not None:
        if not _is_complete(path, manifest["n_rows"], manifest["shard_size"]):
            raise PopyouError(f"{path} is unfinished ({manifest['n_rows']} rows asked); "
                              f"rerun 'popyou {manifest['stage']}' on it to finish")
    if not (path / STATE).is_file() or not (path / INFO).is_file():
        raise PopyouError(f"{path} is not a dataset folder (no {STATE}); make it with 'popyou gen-data'")
    ds = datasets.load_from_disk(str(path))
    if not isinstance(ds, datasets.Dataset):
        raise PopyouError(f"{path} holds several splits (a DatasetDict); point at one split's folder")
    if INDEX not in ds.column_names:  # a plain save_to_disk root: its row number is its index (in memory only)
        ds = ds.add_column(INDEX, np.arange(len(ds), dtype=np.int64))
    return ds, manifest


def load_stage(path: str | os.PathLike) -> datasets.Dataset:
    """Load a stage folder joined side by side with its parents (nearest first). Arrow tables are
    concatenated along columns, so nothing is copied: ancestor columns stay memory-mapped.

    A column repeated in an ancestor (e.g. `error`) keeps its plain name in the nearest stage; the
    ancestor's copy becomes `<stage>_<column>` (e.g. `caption_error`). A parent with more rows (it grew
    later) contributes its first rows; one with fewer rows, or other indices, is an error."""
    path = Path(path)
    child, manifest = _load_one(path)
    parts, names, seen = [child], set(child.column_names), {os.path.realpath(path)}
    index = child.data.column(INDEX)
    p = _parent_of(path, manifest)
    while p is not None:
        if os.path.realpath(p) in seen:
            raise PopyouError(f"{p}: parent folders form a loop")
        seen.add(os.path.realpath(p))
        ds, m = _load_one(p)
        if len(ds) < len(child):
            raise PopyouError(f"parent folder {p} has {len(ds)} rows but {path} has {len(child)}; "
                              f"rerun 'popyou {(m or {}).get('stage', 'gen-data')}' with the larger n")
        if len(ds) > len(child):
            ds = ds.select(range(len(child)))  # contiguous: a zero-copy slice
        if not ds.data.column(INDEX).equals(index):
            raise PopyouError(f"parent folder {p} lists other rows (its 'index' differs from {path}'s)")
        ds = ds.remove_columns(INDEX)
        prefix = (m or {}).get("stage", "parent").replace("-", "_")
        renames = {c: f"{prefix}_{c}" for c in ds.column_names if c in names}
        if renames:
            ds = ds.rename_columns(renames)
        names |= set(ds.column_names)
        parts.append(ds)
        p = _parent_of(p, m)
    return datasets.concatenate_datasets(parts, axis=1) if len(parts) > 1 else child


def require_columns(ds: datasets.Dataset, columns: Iterable[str], *, for_stage: str,
                    path: str | os.PathLike | None = None) -> None:
    """Raise PopyouError naming the first missing column and the subcommand that makes it."""
    for c in columns:
        if c in ds.column_names:
            continue
        if path is None:  # the folder of the dataset's first (nearest) file
            files = ds.cache_files
            path = Path(files[0]["filename"]).parent if files else "the input dataset"
        maker = producer_of(c)
        made = f"it is made by 'popyou {maker}'" if maker else "no popyou subcommand makes it"
        raise PopyouError(f"column '{c}' not found in {path}; {made} (needed by 'popyou {for_stage}')")


def materialize(path: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the joined dataset of `path` to `out` as a standalone `save_to_disk` folder (no parents needed).
    It is written beside `out` and renamed into place, so `out` never holds half a copy."""
    out = Path(out)
    check_not_same(path, out)
    ds = load_stage(path)
    if _visible_entries(out):
        if not overwrite:
            raise PopyouError(f"output folder {out} is not empty; pass --overwrite to replace it")
        if not ((out / STATE).is_file() or (out / MANIFEST).is_file()):
            raise PopyouError(f"output folder {out} is not a dataset folder; refusing to replace it")
    check_writable(out.parent)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    try:
        ds.save_to_disk(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
