"""The images `popyou eval` compares with: FID/KID reference sets and an existing `popyou sample` folder.

A reference set is a data set's images (a popyou stage folder or any datasets.save_to_disk folder, column
`image`) or a folder of image files, each resized and centre-cropped to the generated images' size as encode
does. Its Inception features are cached in popyou's cache folder (core.files.cache_root(), i.e. $POPYOU_CACHE or
~/.cache/popyou), `fid-reference/<key>.npz`, never in the reference folder (which may be read-only or shared). The
key is a hash of everything that changes the features: the feature network, the image size, which images, and
the data set's manifest with its content hash (for a folder of image files: the folder and its files' names,
sizes and times). The file holds the features themselves, not only their mean and covariance: KID needs them,
and FID with fewer images than dimensions is computed from them (metrics.py). A later eval with the same
reference reads the file instead of decoding and featurising thousands of images again; an unwritable cache
folder only costs that time.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from popyou_cli.core.errors import PopyouError
from popyou_cli.core.formats import SAMPLES_JSONL

CACHE_SUBFOLDER = "fid-reference"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class ReferenceSet:
    """Where the reference images are and which ones; `load()` decodes them (N, size, size, 3) uint8."""
    folder: Path  # where the images are
    what: str  # which of them, for the report, e.g. "2000 training rows"
    key: dict  # what identifies the images (part of the cache key)
    load: Callable[[], torch.Tensor]
    count: int


def _prepared(img, size: int) -> torch.Tensor:
    from popyou_cli.core.images import default_resize, resize_center_crop

    return torch.from_numpy(np.asarray(resize_center_crop(img, default_resize(size), size)).copy())


def dataset_images(ds, rows: Sequence[int], size: int, column: str = "image") -> torch.Tensor:
    """Rows of a datasets.Dataset, decoded, resized and centre-cropped as encode does; undecodable rows are left out."""
    from popyou_cli.core.images import open_rgb

    out = []
    for i in rows:
        img, _ = open_rgb(ds[int(i)][column])
        if img is not None:
            out.append(_prepared(img, size))
    if not out:
        raise PopyouError("no decodable images to compare with")
    return torch.stack(out)


def dataset_reference(folder: Path, rows: Sequence[int], size: int, what: str, ds=None) -> ReferenceSet:
    """Rows of the data set in `folder` (a stage folder, joined with its parents) as a reference set."""
    from popyou_cli.store import load_stage, read_manifest

    ds = load_stage(folder) if ds is None else ds
    if "image" not in ds.column_names:
        raise PopyouError(f"{folder} has no 'image' column to compare with")
    rows = [int(r) for r in rows]
    try:
        manifest = read_manifest(folder)
    except Exception:  # noqa: BLE001 - a plain datasets folder: its state file stands for its content
        manifest = _file_stamp(folder / "state.json")
    key = {"data": manifest, "rows": hashlib.sha256(np.asarray(rows, np.int64).tobytes()).hexdigest()}
    return ReferenceSet(Path(folder), f"{len(rows)} {what}", key,
                        lambda: dataset_images(ds, rows, size), len(rows))


def folder_reference(folder: Path, size: int, max_images: int) -> ReferenceSet:
    """Image files under `folder` (recursively, sorted by path), the first `max_images`."""
    from popyou_cli.core.images import load_rgb_file

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:max_images]
    if not files:
        raise PopyouError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}) to compare with")

    def load() -> torch.Tensor:
        out = []
        for path in files:
            try:
                out.append(_prepared(load_rgb_file(path), size))
            except PopyouError:
                continue  # an unreadable file (or a decompression bomb) stays out of the reference set
        if not out:
            raise PopyouError(f"none of the image files in {folder} could be read")
        return torch.stack(out)

    # No content hash here: the folder itself (the cache is shared by every folder) and its files' stamps.
    key = {"folder": str(Path(folder).resolve()), "files": [[str(p.relative_to(folder)), *_file_stamp(p)] for p in files]}
    return ReferenceSet(Path(folder), f"{len(files)} image files", key, load, len(files))


def any_reference(path: Path, size: int, max_images: int) -> ReferenceSet:
    """--reference: a data set folder or a folder of image files."""
    path = Path(path)
    if not path.is_dir():
        raise PopyouError(f"--reference {path}: no such folder (give a data set folder or a folder of images)")
    if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
        from popyou_cli.store import load_stage

        ds = load_stage(path)
        return dataset_reference(path, range(min(len(ds), max_images)), size, "data set rows", ds)
    return folder_reference(path, size, max_images)


def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [st.st_size, int(st.st_mtime)]


def reference_features(ref: ReferenceSet, network: str, size: int, featurise: Callable[[torch.Tensor], torch.Tensor],
                       console=None) -> tuple[torch.Tensor, bool]:
    """(features of the reference images, whether they came from the cache)."""
    from popyou_cli.core.files import cache_root

    key = json.dumps({"version": 1, "network": network, "size": size, **ref.key}, sort_keys=True, default=str)
    path = cache_root() / CACHE_SUBFOLDER / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                if str(stored["key"]) == key:
                    return torch.from_numpy(stored["features"].astype(np.float64)), True
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is recomputed and replaced
    features = featurise(ref.load())
    _save(path, key, features, console)
    return features, False


def _save(path: Path, key: str, features: torch.Tensor, console) -> None:
    f64 = features.double().numpy()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            # The features (KID needs them; FID's mean and covariance follow from them), not the 2048^2 covariance.
            np.savez(f, key=np.array(key), features=f64.astype(np.float32), mu=f64.mean(0))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # an unwritable cache: eval still works, only slower next time
        tmp.unlink(missing_ok=True)
        if console is not None:
            console.print(f"note: cannot cache the FID reference features in {path.parent} ({e.strerror})",
                          highlight=False, markup=False)


# ------------------------------------------------------------------------------------------ existing samples
def read_sample_folder(folder: Path) -> tuple[list[dict], torch.Tensor]:
    """The records of a `popyou sample` folder (samples.jsonl) and its images (N, H, W, 3) uint8, in file order.
    Only the folder's own files are read: a record naming an absolute path, a way up or a link out is refused."""
    from popyou_cli.core.files import resolve_recorded
    from popyou_cli.core.images import load_rgb_file

    folder = Path(folder)
    jsonl = folder / SAMPLES_JSONL
    if not jsonl.is_file():
        raise PopyouError(f"--images {folder}: no {SAMPLES_JSONL} there (give a folder made by 'popyou sample')")
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    images = []
    for r in records:
        if not r.get("prompt") or not r.get("path"):
            raise PopyouError(f"{jsonl}: every line needs 'prompt' and 'path'")
        try:
            img = load_rgb_file(resolve_recorded(str(r["path"]), folder, inside=True))
        except PopyouError as e:
            raise PopyouError(f"--images: {e}") from None
        images.append(torch.from_numpy(np.asarray(img).copy()))
    if len(images) < 2:
        raise PopyouError(f"--images {folder}: eval needs at least 2 images (found {len(images)})")
    if len({tuple(im.shape) for im in images}) > 1:
        raise PopyouError(f"--images {folder}: the images differ in size; score one sample run at a time")
    return records, torch.stack(images)
