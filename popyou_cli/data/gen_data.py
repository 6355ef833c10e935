"""`popyou gen-data`: synthetic Funko Pop! images from a text-to-image model (SDXL-Turbo by default).

Row i holds prompt i of the attribute scheme (`prompts.make_prompt(scheme, seed, i)`) and the image made from it
with its own generator seeded by `image_seed(seed, i)`, in a batch fixed by (i, shard size, batch size) alone
(`batch_grid`). So an image does not depend on n, on the process that made it or on a run that was interrupted:
resume, growing n and multi-process runs give the bytes of one uninterrupted run, and `remake_image` rebuilds
any row from the manifest. Bit-for-bit equality needs the same kind of device and dtype (CPU and CUDA round
differently); everything else that changes pixels is recorded in the manifest and checked on every rerun.

Work is split in shards (see store.py): shard k is always rows [k*shard_size, (k+1)*shard_size), and a shard
file appears only once complete, so a SIGKILL loses at most the shards in flight. With several processes
(accelerate launch / torchrun), process r makes the shards k with k % world_size == r.

Throughput: the accelerator only generates; PNG/JPEG/WebP encoding runs in a thread pool and shard writing in
one more thread, both overlapping the next batches. Bounded queues keep memory flat when the disk is slower.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from popyou_cli.core import presets as P
from popyou_cli.core.bounds import MAX_BATCH, check_finite, check_int, check_rows, check_seed
from popyou_cli.data.runner import DataStage, DataStageResult, check_at_least_1, check_workers
from popyou_cli.core.devices import resolve_device
from popyou_cli.core.errors import PopyouError
from popyou_cli.core.files import resolve_recorded
from popyou_cli.core.images import to_uint8
from popyou_cli.data.prompts import PromptRow, default_scheme, iter_prompts, load_scheme, scheme_from_dict

STAGE = "gen-data"
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
DEFAULT_QUALITY = {"jpeg": 95, "webp": 90}  # PNG is lossless: no quality
MAX_SIZE = 4096  # pixels a side: SDXL-class models are trained at 512-1024; beyond this is a typo
SEED_RULE = "blake2b-8('popyou-image/{seed}/{i}') >> 1"  # recorded in the manifest: how the seed column is made


def image_seed(seed: int, i: int) -> int:
    """The generator seed of image i: a 63-bit hash of (seed, i). A hash, not seed + i, so that the images of
    seed 0 and seed 1 do not overlap shifted by one row; 63 bits so it fits the int64 `seed` column."""
    digest = hashlib.blake2b(f"popyou-image/{int(seed)}/{int(i)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def features(scheme) -> "datasets.Features":  # noqa: F821 - imported lazily
    import datasets

    # One string field per attribute of the scheme (None when the row did not draw it), so that rows can be
    # filtered by attribute without parsing text.
    return datasets.Features({
        "index": datasets.Value("int64"), "prompt": datasets.Value("string"), "seed": datasets.Value("int64"),
        "attributes": {name: datasets.Value("string") for name in scheme.names}, "image": datasets.Image()})


def scheme_settings(scheme) -> dict:
    """The prompt scheme as the manifest stores it. Attributes go in a list: the manifest is written with sorted
    keys, and a dict would come back in alphabetical order, which draws other prompts (order matters)."""
    d = scheme.to_dict()
    return {"template": d["template"], "attributes": [{"name": k, **v} for k, v in d["attributes"].items()]}


def scheme_from_settings(stored: dict):
    """Inverse of scheme_settings: the exact scheme of a gen-data folder (from its manifest's settings)."""
    return scheme_from_dict({"base": "empty", "template": stored["template"], "attributes": {
        a["name"]: {k: v for k, v in a.items() if k != "name"} for a in stored["attributes"]}})


def encode_image(pixels, image_format: str = "png", quality: int | None = None) -> bytes:
    """(H, W, 3) uint8 array -> file bytes. Deterministic: the same pixels and settings give the same bytes."""
    from PIL import Image

    buf = io.BytesIO()
    kw = {} if image_format == "png" else {"quality": int(quality or DEFAULT_QUALITY[image_format])}
    Image.fromarray(pixels).save(buf, format=IMAGE_FORMATS[image_format], **kw)
    return buf.getvalue()


@contextlib.contextmanager
def _quiet():
    """Silence per-call library chatter: diffusers logs the cut-off text of every prompt longer than CLIP's 77
    tokens (truncation is expected and harmless here), the Euler-A scheduler a numpy DeprecationWarning."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    old = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            # diffusers' SDXL calls its own deprecated upcast_vae() on every fp16 batch (see third_party/common.py)
            warnings.filterwarnings("ignore", message=r".*`upcast_vae` is deprecated.*", category=FutureWarning)
            yield
    finally:
        dlog.set_verbosity(old[0])
        tlog.set_verbosity(old[1])


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], *, size: int, steps: int, guidance: float):
    """One batch -> (B, H, W, 3) uint8 CPU tensor. One CPU generator per image: its starting noise (and the
    scheduler's per-step noise) depends only on its own seed, whatever the device or the batch (the arithmetic
    after that may still round differently for another batch shape: see batch_grid)."""
    import torch

    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with torch.inference_mode(), _quiet():
        images = pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance, height=size,
                      width=size, generator=gens, output_type="pt").images
    if not torch.isfinite(images).all():  # e.g. an fp16 VAE overflow: refuse to store black images
        raise PopyouError("the model produced NaN/inf pixels (fp16 overflow?); rerun with --dtype bf16 or fp32")
    return to_uint8(images)


def load_pipeline(model: str, *, device, dtype, size: int):
    from popyou_cli.third_party import load_text_to_image

    with _quiet():
        return load_text_to_image(model, device=device, dtype=dtype, image_size=size)


def _check(n: int, p: P.GenDataPreset, quality: int | None, seed: int) -> None:
    check_at_least_1(("--n", n), ("--shard-size", p.shard_size), ("--batch-size", p.batch_size))
    check_rows(n, p.shard_size)  # bounds.py says why 10^9 rows in at most 10^6 shards
    check_int("--batch-size", p.batch_size, 1, MAX_BATCH)
    check_seed("--seed", seed)
    if p.size < 8 or p.size % 8 or p.size > MAX_SIZE:
        raise PopyouError(f"--image-size must be a multiple of 8 in 8..{MAX_SIZE} (got {p.size})")
    check_at_least_1(("--steps", p.steps))
    check_int("--steps", p.steps, 1, 1000)
    check_finite(guidance=p.guidance)
    if p.guidance < 0:
        raise PopyouError(f"--guidance must be >= 0 (got {p.guidance})")
    if p.image_format not in IMAGE_FORMATS:
        raise PopyouError(f"unknown --format '{p.image_format}' (use {', '.join(IMAGE_FORMATS)})")
    if quality is not None and p.image_format == "png":
        raise PopyouError("--quality applies to jpeg and webp only (PNG is lossless)")
    if quality is not None and not 1 <= quality <= 100:
        raise PopyouError(f"--quality must be in 1..100 (got {quality})")


def row_bytes(p: P.GenDataPreset) -> int:
    """An upper estimate of one row on disk, for the space check before any work: PNGs of generated pictures
    take 40-60% of their raw pixels (noise all of it), JPEG/WebP at high quality about a third; plus the prompt."""
    raw = 3 * p.size * p.size
    return int(raw * (0.75 if p.image_format == "png" else 0.35)) + 1024


def _attribute_rows(rows: list[PromptRow], names: list[str]) -> list[dict]:
    return [{name: r.attributes.get(name) for name in names} for r in rows]


def _write(writer, spec, rows: list[PromptRow], seeds: list[int], images: list[Future], names: list[str]) -> None:
    writer.write_shard(spec, {"index": [r.index for r in rows], "prompt": [r.prompt for r in rows],
                              "seed": seeds, "attributes": _attribute_rows(rows, names),
                              "image": [f.result() for f in images]})


def batch_grid(shard_start: int, shard_size: int, batch_size: int, start: int, stop: int):
    """The batches [b0, b1) that make rows [start, stop) of the shard beginning at shard_start.

    Batches sit on a fixed grid inside each shard (shard_start + j * batch_size, cut at the shard's end, not at
    n), so a row is always generated in the same company: kernels can round differently for another batch shape
    (off by one in a few pixels even on CPU), and this keeps resume, a grown n and any process count bit-identical
    to one uninterrupted run. It costs at most batch_size - 1 discarded images at either end of a shard."""
    first = shard_start + (start - shard_start) // batch_size * batch_size
    return [(b0, min(b0 + batch_size, shard_start + shard_size)) for b0 in range(first, stop, batch_size)]


def _produce(writer, specs, pipe, scheme, seed: int, p: P.GenDataPreset, quality, workers: int, advance) -> None:
    """Generate on the caller's thread, encode on `workers` threads (0: on the caller's thread too, as --workers 0
    means "in the main process" in every stage), write shards on one more thread."""
    encoders = ThreadPoolExecutor(workers, thread_name_prefix="popyou-encode") if workers else _InlineEncoder()
    shard_writer = ThreadPoolExecutor(1, thread_name_prefix="popyou-write")
    writes: deque[Future] = deque()
    backlog: deque[Future] = deque()
    max_backlog = 2 * p.batch_size + workers  # raw images waiting for the encoders: bounded memory
    try:
        for spec in specs:
            rows, images = [], []
            for b0, b1 in batch_grid(spec.shard_start, p.shard_size, p.batch_size, spec.start, spec.stop):
                batch = list(iter_prompts(scheme, seed, b0, b1))
                pixels = generate(pipe, [r.prompt for r in batch], [image_seed(seed, r.index) for r in batch],
                                  size=p.size, steps=p.steps, guidance=p.guidance).numpy()
                keep = [k for k, r in enumerate(batch) if spec.start <= r.index < spec.stop]
                rows += [batch[k] for k in keep]
                images += [encoders.submit(encode_image, pixels[k], p.image_format, quality) for k in keep]
                backlog.extend(images[len(images) - len(keep):])
                advance(len(keep))
                while len(backlog) > max_backlog:
                    backlog.popleft().result()  # re-raises an encoding error here, promptly
            seeds = [image_seed(seed, r.index) for r in rows]
            writes.append(shard_writer.submit(_write, writer, spec, rows, seeds, images, scheme.names))
            while len(writes) > 1:  # one shard written while the next one generates
                writes.popleft().result()
        while writes:
            writes.popleft().result()
    finally:
        # On an error or Ctrl-C: drop queued work; a shard half written stays a hidden temporary file.
        encoders.shutdown(wait=True, cancel_futures=True)
        shard_writer.shutdown(wait=True, cancel_futures=True)


class _InlineEncoder:
    """The executor of --workers 0: runs each encoding at once on the calling thread."""

    def submit(self, fn, *args) -> Future:
        done: Future = Future()
        try:
            done.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001 - re-raised by .result(), as a thread pool's future does
            done.set_exception(e)
        return done

    def shutdown(self, **_) -> None:
        pass


@dataclass
class GenDataResult(DataStageResult):
    """What `gen_data` did; `done` rows were generated now (all processes), `process_done` by this one."""
    model: str = ""

    def summary(self) -> str:
        where = f"{self.out} holds {self.n} rows ({self.model}, {self.device}, {self.dtype})"
        if not self.done:
            return f"gen-data: nothing to do; {where}"
        rate = f"{self.process_done} in {self.seconds:.1f} s"
        if self.images_per_s:
            rate += f", {self.images_per_s:.1f} images/s"
        if self.world_size > 1:
            rate = f"{self.world_size} processes; this one: {rate}"
        return f"gen-data: {self.done} new rows ({rate}); {where}"


def gen_data(*, out: str | Path, n: int, preset: str = "full", model: str | None = None, seed: int = 0,
             batch_size: int | None = None, shard_size: int | None = None, size: int | None = None,
             steps: int | None = None, guidance: float | None = None, image_format: str | None = None,
             quality: int | None = None, prompt_file: str | Path | None = None, device: str = "auto",
             dtype: str | None = None, overwrite: bool = False, workers: int | None = None,
             progress: bool = True, console=None) -> GenDataResult:
    """Make (or finish, or grow) the gen-data folder `out` with rows 0..n-1. Options left as None come from the
    preset. Run it in every process of an accelerate/torchrun launch; each makes its share of the shards."""
    import os

    p = P.resolve(P.get_preset(P.GEN_DATA_PRESETS, preset, stage=STAGE), model=model, batch_size=batch_size,
                  shard_size=shard_size, size=size, steps=steps, guidance=guidance,
                  image_format=image_format.lower() if image_format else None, dtype=dtype)
    _check(n, p, quality, seed)
    check_workers(workers or 0)
    workers = max(1, min(8, (os.cpu_count() or 2) - 1)) if workers is None else workers
    scheme = load_scheme(prompt_file) if prompt_file else default_scheme()
    run = DataStage(STAGE, device, p.dtype)  # SDXL-Turbo's VAE is upcast for decoding by diffusers
    # Everything that changes an image or a row; a folder made with other values is refused (store.py). The batch
    # size is in: it changes rounding (see batch_grid). Device and workers are out: the same kind of device is
    # the user's part (CPU and CUDA round differently), and workers change speed only.
    settings = {"model": p.model, "size": p.size, "steps": p.steps, "guidance": p.guidance, "seed": seed,
                "batch_size": p.batch_size,
                "dtype": run.dtype_name, "image_format": p.image_format,
                "quality": None if p.image_format == "png" else int(quality or DEFAULT_QUALITY[p.image_format]),
                "seed_rule": SEED_RULE, "prompt_scheme": scheme_settings(scheme)}
    specs = run.open(out, parent=None, settings=settings, features=features(scheme), n_rows=n,
                     shard_size=p.shard_size, overwrite=overwrite, row_bytes=row_bytes(p))
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    if specs:  # a finished folder does not even load the model
        pipe = load_pipeline(p.model, device=run.device, dtype=run.dtype, size=p.size)
        with run.running(progress, console) as advance:
            _produce(run.writer, specs, pipe, scheme, seed, p, settings["quality"], workers, advance)
    return run.finish(None, GenDataResult, model=p.model)


def remake_image(folder: str | Path, i: int, *, device: str = "auto", exact: bool = True):
    """Row i's image made again from the folder's recorded settings, without reading the data: (PIL image, encoded
    bytes). exact=True generates row i's whole batch (at most batch_size images; see batch_grid), which gives
    the stored bytes on the same kind of device and dtype; exact=False generates row i by itself, equal up to
    the rounding of a few pixel values."""
    from PIL import Image

    from popyou_cli.store import read_manifest

    manifest = read_manifest(folder)
    if manifest is None or manifest.get("stage") != STAGE:
        raise PopyouError(f"{folder} is not a popyou gen-data folder")
    s, shard_size = manifest["settings"], manifest["shard_size"]
    scheme = scheme_from_settings(s["prompt_scheme"])
    shard_start = i // shard_size * shard_size
    b0, b1 = batch_grid(shard_start, shard_size, s["batch_size"], i, i + 1)[0] if exact else (i, i + 1)
    batch = list(iter_prompts(scheme, s["seed"], b0, b1))
    model = resolve_recorded(s["model"], folder)  # a local model is recorded relative to the folder
    pipe = load_pipeline(model, device=resolve_device(device), dtype=s["dtype"], size=s["size"])
    pixels = generate(pipe, [r.prompt for r in batch], [image_seed(s["seed"], r.index) for r in batch],
                      size=s["size"], steps=s["steps"], guidance=s["guidance"]).numpy()[i - b0]
    return Image.fromarray(pixels), encode_image(pixels, s["image_format"], s["quality"])
