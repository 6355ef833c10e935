"""Beta-sweep outputs shared by `popyou demo` and `popyou sample --beta-sweep`: frames that carry their beta value,
a labelled strip of them, and an H.264 MP4 written by the ffmpeg that the imageio-ffmpeg wheel ships (no system
ffmpeg needed)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from popyou_cli.core.errors import PopyouError
from popyou_cli.core.files import committing
from popyou_cli.core.images import label_font

STRIP_MAX_COLUMNS = 16  # longer sweeps wrap into rows of equal length: 11 frames stay one row, 20 are 2 x 10


def beta_label(beta: float) -> str:
    return f"beta {beta:.2f}"


def label_frame(frame: Image.Image, label: str) -> Image.Image:
    """A copy of `frame` with `label` in its top-left corner, white on a dark box so it reads on any picture."""
    out = frame.convert("RGB")
    draw = ImageDraw.Draw(out)
    font = label_font(round(out.height / 10))
    pad = max(1, out.height // 64)
    left, top, right, bottom = draw.textbbox((pad, pad), label, font=font)
    draw.rectangle((0, 0, right + pad, bottom + pad), fill=(0, 0, 0))
    draw.text((pad, pad), label, fill=(255, 255, 255), font=font)
    return out


def labelled_strip(frames: list[Image.Image], labels: list[str], max_columns: int = STRIP_MAX_COLUMNS,
                   gap: int = 2) -> Image.Image:
    """The frames side by side, each with its label drawn on it: one row up to `max_columns` frames, else the
    fewest rows of at most `max_columns`, all as full as they can be (21 frames: 11 + 10, never 16 + 5)."""
    if not frames or len(frames) != len(labels):
        raise PopyouError(f"a strip needs one label per frame (got {len(frames)} frames, {len(labels)} labels)")
    w, h = frames[0].size
    rows = -(-len(frames) // max_columns)
    cols = -(-len(frames) // rows)
    strip = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), (255, 255, 255))
    for i, (frame, label) in enumerate(zip(frames, labels)):
        if frame.size != (w, h):
            raise PopyouError(f"frame {i} is {frame.size[0]}x{frame.size[1]}, the first is {w}x{h}")
        strip.paste(label_frame(frame, label), ((i % cols) * (w + gap), (i // cols) * (h + gap)))
    return strip


def write_mp4(frames: list[Image.Image], fps: float, path: str | Path, quality: int = 8) -> Path:
    """An H.264 MP4 (yuv420p, playable in browsers) of `frames` at `fps`, committed whole or not at all."""
    import imageio_ffmpeg

    if not frames:
        raise PopyouError("a video needs at least one frame")
    if not fps > 0:
        raise PopyouError(f"frames per second must be > 0 (got {fps})")
    w, h = frames[0].size
    # yuv420p halves the chroma resolution, so H.264 needs even sizes: pad with black rather than rescale.
    size = (w + w % 2, h + h % 2)
    with committing(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), size, fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=quality, macro_block_size=2,
            ffmpeg_log_level="error",
            output_params=["-movflags", "+faststart", "-f", "mp4"])  # plays before fully loaded; tmp has no .mp4
        try:
            writer.send(None)
            for i, frame in enumerate(frames):
                if frame.size != (w, h):
                    raise PopyouError(f"frame {i} is {frame.size[0]}x{frame.size[1]}, the first is {w}x{h}")
                rgb = frame.convert("RGB")
                if rgb.size != size:
                    padded = Image.new("RGB", size)
                    padded.paste(rgb)
                    rgb = padded
                writer.send(rgb.tobytes())
        finally:
            writer.close()
    return Path(path)


def read_mp4(path: str | Path) -> list[Image.Image]:
    """The decoded frames of a video (for checks and tests)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    return [Image.frombytes("RGB", (w, h), bytes(buf)) for buf in reader]


def write_beta_sweep(frames: list[Image.Image], betas: list[float], path: str | Path,
                     fps: float) -> tuple[Path, Image.Image]:
    """The two outputs of a beta sweep, for `popyou demo` and `popyou sample --beta-sweep` alike: the MP4 at `path`
    with each frame's beta drawn on it, and the labelled strip (returned, not saved)."""
    labels = [beta_label(b) for b in betas]
    mp4 = write_mp4([label_frame(f, label) for f, label in zip(frames, labels)], fps, path)
    return mp4, labelled_strip(frames, labels)
