"""Reading stage folders: joined with their parents (zero copy), column checks, a standalone copy."""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Iterable

import datasets
import numpy as np

from popyou_cli.core.errors import PopyouError, short_error
from popyou_cli.core.files import disk_full_error, ensure_writable_dir, remove, sweep_temporaries, temporary_name

from popyou_cli.store.folder import _parent_of, _visible_entries, check_can_replace, check_not_same
from popyou_cli.store.layout import (INDEX, INFO, MANIFEST, STATE, _is_complete, is_being_replaced, read_manifest,
                                     shard_names as _shard_names)
from popyou_cli.store.lineage import check_lineage, shard_range

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


def _load_one(path: Path) -> tuple[datasets.Dataset, dict | None]:
    if not path.is_dir():
        raise PopyouError(f"input folder {path} does not exist")
    if is_being_replaced(path):
        raise PopyouError(f"{path} is half replaced: an --overwrite of it was interrupted; rerun the command that "
                          "made it to finish")
    manifest = read_manifest(path)
    if manifest is not None:
        if not _is_complete(path, manifest["n_rows"], manifest["shard_size"]):
            raise PopyouError(f"{path} is unfinished ({manifest['n_rows']} rows asked); "
                              f"rerun 'popyou {manifest['stage']}' on it to finish")
        _check_shard_files(path, manifest)
    if not (path / STATE).is_file() or not (path / INFO).is_file():
        raise PopyouError(f"{path} is not a dataset folder (no {STATE}); make it with 'popyou gen-data'")
    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:  # a plain folder with a missing or broken file
        raise PopyouError(f"cannot read the dataset folder {path}: {short_error(e, 160, with_type=True)}") from None
    if not isinstance(ds, datasets.Dataset):
        raise PopyouError(f"{path} holds several splits (a DatasetDict); point at one split's folder")
    if INDEX not in ds.column_names:  # a plain save_to_disk root: its row number is its index (in memory only)
        ds = ds.add_column(INDEX, np.arange(len(ds), dtype=np.int64))
    return ds, manifest


def _check_shard_files(path: Path, manifest: dict) -> None:
    """Every shard file the folder lists is there with the size it was written with: a stat per shard, the
    cheap half of `popyou verify` (which also re-hashes the bytes)."""
    sizes = {e["file"]: e["bytes"] for e in manifest.get("shards", [])}
    for name in _shard_names(manifest["n_rows"], manifest["shard_size"]):
        try:
            st = (path / name).stat()
            size = st.st_size if stat.S_ISREG(st.st_mode) else -1  # a named pipe or device is no shard
        except OSError:
            size = None
        if size is None or size < 0 or (name in sizes and size != sizes[name]):
            _, start, stop = shard_range(name)
            what = "is missing" if size is None else "is damaged (its size changed)"
            raise PopyouError(f"{path}: the shard file of rows {start}..{stop - 1} ({name}) {what}; rerun "
                              f"'popyou {manifest['stage']}' on it to remake it ('popyou verify {path}' checks "
                              "every shard)")


def load_stage(path: str | os.PathLike) -> datasets.Dataset:
    """Load a stage folder joined side by side with its parents (nearest first). Arrow tables are
    concatenated along columns, so nothing is copied: ancestor columns stay memory-mapped.

    A column repeated in an ancestor (e.g. `error`) keeps its plain name in the nearest stage; the
    ancestor's copy becomes `<stage>_<column>` (e.g. `caption_error`). A parent with more rows (it grew
    later) contributes its first rows; one with fewer rows, or other indices, or content other than what the
    child was made from (lineage.py: manifests compared, nothing re-hashed), is an error."""
    path = Path(path)
    child, manifest = _load_one(path)
    parts, names, seen = [child], set(child.column_names), {os.path.realpath(path)}
    index = child.data.column(INDEX)
    child_dir, child_manifest = path, manifest
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
        check_lineage(child_dir, child_manifest, p, m)
        child_dir, child_manifest = p, m
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
        check_can_replace(out, [path], made_by=(STATE, MANIFEST))
    ensure_writable_dir(out.parent)
    sweep_temporaries(out.parent, prefix=f"{out.name}.", locked=False)  # copies whose process was killed
    tmp = temporary_name(out)
    try:
        ds.save_to_disk(str(tmp))
        remove(out)
        os.replace(tmp, out)
    except Exception as e:
        raise disk_full_error(e, tmp, ds.data.nbytes) or e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
