"""Pictures in, for the data stages that read images (caption, encode): robust decoding and the batched loader.

A stage must get through whatever a user's dataset holds. `open_rgb` turns one image cell into an 8-bit RGB
PIL image, or into an error message, and never raises:

- converted: grayscale, palette, 1-bit, CMYK, YCbCr (PIL's own conversions); RGBA / LA / palette with
  transparency, composited on white (the Funko backgrounds are white, so a cut-out keeps its look; black would
  invent a dark background); 16-bit and 32-bit grayscale, scaled to 8 bits (PIL's plain convert clips them,
  which turns most 16-bit pictures white); EXIF orientation applied; the first frame of an animation;
- refused with a message: no image, undecodable or truncated files, decompression bombs, pictures under
  `MIN_SIDE` pixels on a side (nothing left to caption or tokenize once scaled up from a handful of pixels).

The stage keeps a refused row, writes placeholders and the message, and counts it at the end.

`RowLoader` + `loader` read rows of a datasets.Dataset in DataLoader worker processes: the workers decode and
preprocess (the slow, CPU-bound part), the main process only runs the models and writes shards.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

from .errors import PopyouError

MIN_SIDE = 8
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WHITE = (255, 255, 255)


def default_workers() -> int:
    return max(0, min(4, os.cpu_count() or 1))


def undecoded(ds, column: str):
    """`ds` whose `column` yields raw cells (bytes / path dicts) instead of PIL images, so that decoding happens
    in `open_rgb`, in the workers, with its error handling. Accepts Image(), binary and path-string columns."""
    import datasets

    feature = ds.features.get(column)
    if isinstance(feature, datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))  # only flips a flag: no data is rewritten
    if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary", "string", "large_string"):
        return ds
    raise PopyouError(f"column '{column}' is not an image column (it holds {feature}); "
                      "choose one with --image-column")


def open_rgb(cell: Any) -> tuple[Image.Image | None, str]:
    """One image cell (a datasets Image dict with bytes/path, raw bytes, a file path or a PIL image) ->
    (8-bit RGB image, "") or (None, one-line reason). Never raises."""
    try:
        with warnings.catch_warnings():
            # Bombs become errors below; PIL's palette-transparency advice is followed in _to_rgb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", message="Palette images with Transparency")
            img = _open(cell)
            if img is None:
                return None, "no image in this row"
            img.load()  # decodes now: a truncated file fails here, not later in a worker's collate
            img = _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return None, f"image too large to decode safely ({short_error(e)})"
    except Exception as e:  # noqa: BLE001 - any decoder failure is bad data, reported per row
        return None, f"undecodable image ({type(e).__name__}: {short_error(e)})"
    if min(img.size) < MIN_SIDE:
        return None, f"image is {img.size[0]}x{img.size[1]} px, under the {MIN_SIDE} px minimum"
    return img, ""


def short_error(e: BaseException, limit: int = 120) -> str:
    text = " ".join(str(e).split())
    return text[:limit - 3] + "..." if len(text) > limit else text


def _open(cell: Any) -> Image.Image | None:
    if cell is None:
        return None
    if isinstance(cell, Image.Image):
        return cell
    if isinstance(cell, dict):  # datasets.Image(decode=False): bytes win, the path is the fallback
        if cell.get("bytes") is not None:
            cell = cell["bytes"]
        elif cell.get("path"):
            cell = cell["path"]
        else:
            return None
    if isinstance(cell, (bytes, bytearray, memoryview)):
        if len(cell) == 0:
            return None
        return Image.open(io.BytesIO(bytes(cell)))
    if isinstance(cell, str):
        return Image.open(os.path.expanduser(cell))
    raise TypeError(f"unsupported image cell of type {type(cell).__name__}")


def _to_rgb(img: Image.Image) -> Image.Image:
    try:
        img = ImageOps.exif_transpose(img)  # phone photos in an imagefolder are often stored sideways
    except Exception:  # noqa: BLE001 - a broken EXIF block must not cost the picture
        pass
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_gray_to_u8(np.asarray(img), mode)).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def _gray_to_u8(a: np.ndarray, mode: str) -> np.ndarray:
    """High-bit-depth grayscale -> uint8, keeping contrast: 16-bit (and 32-bit holding 16-bit values, as PIL
    reads some 16-bit PNGs) is divided by 257 (65535 -> 255); floats in [0, 1] are scaled by 255."""
    a = a.astype(np.float64)
    if mode == "F":
        peak = np.nanmax(a) if a.size else 0.0
        a = a * 255.0 if peak <= 1.0 else a
    elif mode.startswith("I;16") or (a.size and a.max() > 255):
        a = a / 257.0
    return np.clip(np.nan_to_num(np.rint(a)), 0, 255).astype(np.uint8)


def resize_center_crop(img: Image.Image, resize: int, crop: int) -> Image.Image:
    """torchvision's Resize(resize, LANCZOS) then CenterCrop(crop), as the original VAR data pipeline, done as
    two one-axis PIL resizes of the crop's source box. Each pass samples the same source positions as the full
    resize (PIL reads the box with the whole image around it), so the result matches resize-then-crop within 2 of
    255 levels (fixed-point rounding; checked in the tests), but nothing larger than the source is ever allocated, even for a 100:1 panorama. (A single 2-D
    box resize does not match: Pillow 13 clips the taps of the box's first rows.)"""
    w, h = img.size
    if w <= h:  # torchvision: the short side becomes `resize`, the long side is truncated, not rounded
        nw, nh = resize, int(resize * h / w)
    else:
        nw, nh = int(resize * w / h), resize
    if crop > min(nw, nh):
        raise ValueError(f"crop {crop} larger than the resized image {nw}x{nh}")
    left, top = int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))
    sx, sy = w / nw, h / nh
    lanczos = Image.Resampling.LANCZOS
    img = img.resize((crop, h), lanczos, box=(left * sx, 0, (left + crop) * sx, h))  # horizontal pass first,
    return img.resize((crop, crop), lanczos, box=(0, top * sy, crop, (top + crop) * sy))  # as PIL's own


def to_pm1(img: Image.Image):
    """8-bit RGB image -> (3, H, W) float32 tensor in [-1, 1], computed as VAR's normalize_01_into_pm1."""
    import torch

    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    return x.add(x).sub_(1)


class RowLoader:
    """A map-style torch dataset over rows of a datasets.Dataset. DataLoader hands it a whole batch of row
    numbers (`__getitems__`), which costs one Arrow read per batch, not one per row; `prepare(row, cells)` runs
    in the worker on each row's cells (a dict column -> value) and returns what the stage's collate takes."""

    def __init__(self, ds, prepare: Callable[[int, dict], Any]):
        self.ds, self.prepare = ds, prepare

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, rows: Sequence[int]) -> list:
        batch = self.ds[list(rows)]
        return [self.prepare(r, {c: batch[c][k] for c in batch}) for k, r in enumerate(rows)]

    def __getitem__(self, row: int):
        return self.__getitems__([row])[0]


def shard_batches(specs, batch_size: int) -> list[list[int]]:
    """Row batches in shard order that never straddle two shards: a shard is written as soon as its last batch
    is done, so a kill loses at most the shard in flight."""
    return [list(range(b, min(b + batch_size, s.stop))) for s in specs for b in range(s.start, s.stop, batch_size)]


def loader(ds, prepare, collate, batches: list[list[int]], workers: int, pin_memory: bool = False):
    """A DataLoader yielding collate(list of prepared rows) for each batch, in order."""
    from torch.utils.data import DataLoader

    # Workers are forked after the tokenizers' Rust thread pool may have run; they are the parallelism here.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(RowLoader(ds, prepare), batch_sampler=batches, collate_fn=collate, num_workers=workers,
                      pin_memory=pin_memory, prefetch_factor=4 if workers else None)


def write_in_shards(writer, specs, results, advance) -> None:
    """Consume `results`, an iterator of (rows, {column: values}) per batch in the order of shard_batches(specs),
    and write each shard the moment its last row is in. Everything a shard needs is in memory only until then,
    so memory is one shard's results, whatever the data set size."""
    from . import runtime

    specs = iter(specs)
    spec, columns = next(specs, None), {}
    for rows, values in results:
        if spec is None or rows[0] < spec.start or rows[-1] >= spec.stop:
            raise RuntimeError(f"batch of rows {rows[0]}..{rows[-1]} outside the shard being written")
        for name, vals in values.items():
            columns.setdefault(name, []).extend(vals)
        advance(len(rows))
        runtime.debug_pause()
        if rows[-1] == spec.stop - 1:
            writer.write_shard(spec, columns)
            spec, columns = next(specs, None), {}


def open_input(dataset, out, *, stage: str, image_column: str, columns: Sequence[str] = ()):
    """The input of an image stage: the dataset joined with its parents (store.load_stage), checked before any
    model loads: --out must not overlap it, the needed columns must exist (else a one-line error naming the
    subcommand that makes them), and its rows must be 0..n-1 in order, since the output joins it row by row."""
    from .store import check_not_same, load_stage, require_columns

    check_not_same(dataset, out)
    ds = load_stage(dataset)
    require_columns(ds, [image_column, *columns], for_stage=stage, path=dataset)
    index = ds.data.column("index").to_numpy()
    if not np.array_equal(index, np.arange(len(ds))):
        raise PopyouError(f"{dataset}: its 'index' column is not 0..{len(ds) - 1} in order; "
                          "popyou stages join row by row, so give them a whole stage folder, not a subset")
    undecoded(ds, image_column)  # fails early on a column that holds no images
    if getattr(ds.features[image_column], "dtype", None) in ("string", "large_string"):
        # A path column, or a text column chosen by mistake: one error now beats an error on every row.
        head = ds.select_columns([image_column]).select(range(min(len(ds), 100)))[image_column]
        first = next((v for v in head if v), None)
        if first is not None and not os.path.isfile(os.path.expanduser(first)):
            raise PopyouError(f"column '{image_column}' holds text, not image files (e.g. '{first[:60]}'); "
                              "choose the image column with --image-column")
    return ds


def count_errors(out, column: str) -> tuple[int, str]:
    """(rows of the finished folder `out` whose `column` is not empty, the first such message with its row)."""
    import datasets
    import pyarrow.compute as pc

    table = datasets.load_from_disk(str(out)).data
    col = table.column(column)
    bad = pc.not_equal(pc.fill_null(col, ""), "")
    n = pc.sum(bad).as_py() or 0
    if not n:
        return 0, ""
    first = pc.index(bad, True).as_py()
    return n, f"row {table.column('index')[first].as_py()}: {col[first].as_py()}"


def finish_stage(state, writer, out, todo: int, seconds: float, error_column: str | None) -> dict:
    """The end of a data stage in every process: wait for all, finalize on the main process, count the rows
    with errors in the whole folder (also those of earlier, interrupted runs), release everyone together.
    error_column None (gen-data, which has none): no count, errors 0."""
    done = todo
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        done = sum(gather_object([todo]))  # also a barrier: every shard is written after it
    errors, first = 0, ""
    if state.is_main_process:
        if not writer.is_complete():
            writer.finalize()
        if error_column is not None:
            errors, first = count_errors(out, error_column)
    state.wait_for_everyone()  # nobody returns (and reads the folder) before finalize
    return {"out": str(out), "done": done, "process_done": todo, "seconds": seconds,
            "images_per_s": todo / seconds if seconds else None, "errors": errors, "first_error": first,
            "world_size": state.num_processes, "is_main_process": state.is_main_process}


def summary(stage: str, res: dict, what: str, details: str) -> str:
    """The line an image stage prints at the end; `what` is the verb ("captioned"), `details` the models."""
    errors = (f"; {res['errors']} of {res['n']} rows have an error in {stage}_error (first: {res['first_error']})"
              if res["errors"] else "; no errors")
    if not res["done"]:
        return f"{stage}: {res['out']} already holds all {res['n']} rows; nothing to do{errors}"
    rate = f", {res['images_per_s']:.1f} images/s" if res["images_per_s"] else ""
    per = " on this process" if res["world_size"] > 1 else ""
    return (f"{stage}: {res['out']} holds {res['n']} rows; {what} {res['done']} now ({res['process_done']} in "
            f"{res['seconds']:.1f} s{per}{rate}) with {details} on {res['world_size']} process(es), "
            f"{res['device']}, {res['dtype']}{errors}")
