"""Pixels: images in (robust decoding, VAR's resize and crop) and images out (uint8 tensors, labelled grids, PNGs).

A stage must get through whatever a user's dataset holds. `open_rgb` turns one image cell into an 8-bit RGB
PIL image, or into an error message, and never raises:

- converted: grayscale, palette, 1-bit, CMYK, YCbCr (PIL's own conversions); RGBA / LA / palette with
  transparency, composited on white (the Funko backgrounds are white, so a cut-out keeps its look; black would
  invent a dark background); 16-bit and 32-bit grayscale, scaled to 8 bits (PIL's plain convert clips them,
  which turns most 16-bit pictures white); EXIF orientation applied; the first frame of an animation;
- refused with a message: no image, undecodable or truncated files, decompression bombs, pictures under
  `MIN_SIDE` pixels on a side (nothing left to caption or tokenize once scaled up from a handful of pixels).

The stage keeps a refused row, writes placeholders and the message, and counts it at the end. A file read whole
(`load_rgb_file`: eval's images and references) is refused the same way, as one line.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from popyou_cli.core.errors import PopyouError, short_error
from popyou_cli.core.files import atomic_write

MIN_SIDE = 8
RESIZE_RATIO = (9, 8)  # VAR's data pipeline: resize the short side to 9/8 of the crop (288 -> 256), then crop
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WHITE = (255, 255, 255)
LABEL_INK = (32, 32, 32)  # grid labels: dark grey on the white band under each tile
LABEL_MAX_PX = 14  # label font size: a tenth of the tile width, 8 to 14 px


# PIL refuses an image over twice its pixel limit (DecompressionBombError) and warns, with the library's file path,
# over the limit (DecompressionBombWarning): popyou makes the warning an error and refuses both in one line.
BOMBS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def too_large(e: BaseException) -> str:
    return f"image too large to decode safely ({short_error(e, 120)})"


def load_rgb_file(path: str | os.PathLike) -> Image.Image:
    """An image file, decoded now, as 8-bit RGB (PIL's convert); a missing or undecodable file, or a decompression
    bomb, is a one-line PopyouError ("cannot read PATH (why)")."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.convert("RGB")
    except BOMBS as e:
        raise PopyouError(f"cannot read {path} ({too_large(e)})") from None
    except OSError as e:
        raise PopyouError(f"cannot read {path} ({e})") from None


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
    except BOMBS as e:
        return None, too_large(e)
    except Exception as e:  # noqa: BLE001 - any decoder failure is bad data, reported per row
        return None, f"undecodable image ({short_error(e, 120, with_type=True)})"
    if min(img.size) < MIN_SIDE:
        return None, f"image is {img.size[0]}x{img.size[1]} px, under the {MIN_SIDE} px minimum"
    return img, ""


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


def default_resize(crop: int) -> int:
    """The short side before the centre crop: 9/8 of the crop, as VAR's data pipeline (288 for 256, 72 for 64)."""
    return crop * RESIZE_RATIO[0] // RESIZE_RATIO[1]


def resize_center_crop(img: Image.Image, resize: int, crop: int) -> Image.Image:
    """torchvision's Resize(resize, LANCZOS) then CenterCrop(crop), as the original VAR data pipeline, done as
    two one-axis PIL resizes of the crop's source box. Each pass samples the same source positions as the full
    resize (PIL reads the box with the whole image around it), so the result matches resize-then-crop within 2 of
    255 levels (fixed-point rounding; checked in the tests), but nothing larger than the source is ever
    allocated, even for a 100:1 panorama. (A single 2-D box resize does not match: Pillow 13 clips the taps of
    the box's first rows.)"""
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


def to_uint8(images):
    """(B, 3, H, W) float tensor in [0, 1] -> (B, H, W, 3) uint8 on CPU, rounded to nearest."""
    import torch

    return images.float().mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def label_font(height: int) -> ImageFont.ImageFont:
    """Pillow's built-in scalable font at `height` px (at least 8): no font file needed, the same pixels everywhere."""
    return ImageFont.load_default(size=max(8, height))


def image_label(prompt: str | None, seed: int | None, beta: float | None = None) -> str:
    """The caption under a grid tile: the prompt (the grid shortens it to the tile's width), then its seed, and its
    beta when the grid's images differ in beta."""
    numbers = ([f"seed {seed}"] if seed is not None else []) + ([f"beta {beta:.2f}"] if beta is not None else [])
    return "\n".join(line for line in ((prompt or "").strip(), ", ".join(numbers)) if line)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text` cut (with an ellipsis) to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "…"


def grid(images_u8, ncol: int | None = None, pad: int = 2, labels: list[str] | None = None):
    """(N, H, W, 3) uint8 tensor -> one image with white gaps, `ncol` tiles a row (default: about square). With
    `labels` (one per image, lines split by newlines), a white band under each tile holds its label, each line
    shortened with an ellipsis to the tile's width."""
    import torch

    n, h, w, _ = images_u8.shape
    if labels is not None and len(labels) != n:
        raise ValueError(f"a grid of {n} images needs {n} labels (got {len(labels)})")
    ncol = ncol or min(n, max(1, round(n**0.5 + 0.49)))
    nrow = -(-n // ncol)
    font_px = min(LABEL_MAX_PX, max(8, w // 10))
    lines = max((len(label.split("\n")) for label in labels), default=0) if labels else 0
    band = lines * (font_px + 2) + 2 if lines else 0
    cell = h + band
    out = torch.full((nrow * (cell + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        out[pad + r * (cell + pad):pad + r * (cell + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images_u8[i]
    if not band:
        return out
    canvas = Image.fromarray(out.numpy())
    draw, font = ImageDraw.Draw(canvas), label_font(font_px)
    for i, label in enumerate(labels):
        r, c = divmod(i, ncol)
        for k, line in enumerate(label.split("\n")):
            xy = (pad + c * (w + pad), pad + r * (cell + pad) + h + 1 + k * (font_px + 2))
            draw.text(xy, _fit(draw, line, font, w), fill=LABEL_INK, font=font)
    return torch.from_numpy(np.asarray(canvas).copy())


def save_png(image, path: str | os.PathLike) -> Path:
    """An (H, W, 3) uint8 tensor or array, or a PIL image, as a PNG committed atomically (files.atomic_write)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(image.numpy() if hasattr(image, "numpy") else image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write(path, buf.getvalue())
