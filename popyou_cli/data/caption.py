"""`popyou caption`: one BLIP-2 caption per image of a dataset on disk.

The input is any dataset folder with an image column: a gen-data folder (or a later stage joined to one), or a
plain `datasets` dataset saved with `save_to_disk` (e.g. an imagefolder). The output folder holds `index`,
`caption` and `caption_error` and joins its input side by side (store.load_stage), so images are not copied.

Rows are read and decoded in DataLoader worker processes, which also run the BLIP-2 image processor; the main
process only runs `generate` and writes shards. A picture that cannot be read (images.open_rgb) keeps its row:
caption "" and the reason in caption_error; the count is reported at the end. So is an empty generated caption,
so that later stages, which keep rows whose caption_error is "", never train on an empty text.

Work, resume and processes follow gen-data (store.py): shard k is rows [k*shard_size, (k+1)*shard_size), a shard
appears only once written in full, and process r of an accelerate/torchrun launch does the shards k % world == r.
Greedy and beam search are deterministic, so a resumed run gives the captions of an uninterrupted one (on one
kind of device and dtype, with the same batch size: batched fp16 kernels may round differently).
"""
from __future__ import annotations

from pathlib import Path

from popyou_cli.core import presets as P
from popyou_cli.core.bounds import MAX_BATCH, check_int
from popyou_cli.data.runner import (DataStage, DataStageResult, check_at_least_1, check_workers, default_workers, loader,
                         open_image, open_input, shard_batches, undecoded)
from popyou_cli.data.import_images import stage_input
from popyou_cli.core.errors import short_error

STAGE = "caption"
EMPTY = "the model generated an empty caption"


def features():
    import datasets

    return datasets.Features({"index": datasets.Value("int64"), "caption": datasets.Value("string"),
                              "caption_error": datasets.Value("string")})


class Prepare:
    """In a worker: one row's image cell -> (row, RGB image or None, error). A class, not a closure, so that
    workers started with spawn (macOS, Windows) can receive it."""

    def __init__(self, column: str):
        self.column = column

    def __call__(self, row: int, cells: dict):
        image, error = open_image(cells[self.column])
        return row, image, error


class Collate:
    """In a worker: prepared rows -> (rows, errors, positions of the good images, processor inputs or None).
    The prompt goes through the processor with the images: BLIP-2's processor puts the query-token placeholders
    in front of it. An image the processor rejects is marked bad alone instead of failing its whole batch."""

    def __init__(self, processor, prompt: str | None):
        self.processor, self.prompt = processor, prompt or ""

    def _inputs(self, imgs):
        return self.processor(images=imgs, text=[self.prompt] * len(imgs), return_tensors="pt")

    def __call__(self, items):
        rows = [r for r, _, _ in items]
        errors = [e for _, _, e in items]
        good = [k for k, (_, img, _) in enumerate(items) if img is not None]
        try:
            inputs = self._inputs([items[k][1] for k in good]) if good else None
        except Exception:  # noqa: BLE001 - find the culprit(s), keep the rest of the batch
            for k in list(good):
                try:
                    self._inputs([items[k][1]])
                except Exception as e:  # noqa: BLE001
                    errors[k] = f"the captioner's image processor failed ({short_error(e, 120, with_type=True)})"
                    good.remove(k)
            inputs = self._inputs([items[k][1] for k in good]) if good else None
        return rows, errors, good, inputs


def generate(net, processor, inputs, *, max_new_tokens: int, num_beams: int, device, dtype,
             min_new_tokens: int | None = None) -> list[str]:
    """Processor inputs of a batch -> stripped captions, the prompt removed. min_new_tokens (the bench sets it
    to max_new_tokens for fixed-length timings) is passed per call: the tiny model is shared in-process."""
    import torch

    inputs = inputs.to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    extra = {} if min_new_tokens is None else {"min_new_tokens": min_new_tokens}
    with torch.inference_mode():
        ids = net.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False, **extra)
    # transformers 5 returns the prompt (query placeholders + text) before the new tokens; older versions
    # returned only the new ones. Cut the prompt only where it is really there.
    prefix = inputs["input_ids"]
    if ids.shape[1] >= prefix.shape[1] and torch.equal(ids[:, :prefix.shape[1]].to(prefix.device), prefix):
        ids = ids[:, prefix.shape[1]:]
    return [" ".join(t.split()) for t in processor.batch_decode(ids, skip_special_tokens=True)]


def caption_batches(batches, net, processor, **gen):
    """(rows, {"caption": [...], "caption_error": [...]}) per batch of a Collate loader; gen: generate's options."""
    for rows, errors, good, inputs in batches:
        captions = [""] * len(rows)
        if good:
            made = generate(net, processor, inputs, **gen)
            for k, text in zip(good, made):
                captions[k] = text
                errors[k] = "" if text else EMPTY
        yield rows, {"caption": captions, "caption_error": errors}


def _check(p: P.CaptionPreset, workers: int) -> None:
    check_at_least_1(("--max-new-tokens", p.max_new_tokens), ("--num-beams", p.num_beams),
                     ("--batch-size", p.batch_size), ("--shard-size", p.shard_size))
    check_int("--batch-size", p.batch_size, 1, MAX_BATCH)
    check_int("--max-new-tokens", p.max_new_tokens, 1, 4096)
    check_int("--num-beams", p.num_beams, 1, 64)
    check_workers(workers)


def caption(*, dataset: str | Path, out: str | Path, preset: str = "full", model: str | None = None,
            prompt: str | None = None, max_new_tokens: int | None = None, num_beams: int | None = None,
            batch_size: int | None = None, shard_size: int | None = None, image_column: str = "image",
            device: str = "auto", dtype: str | None = None, workers: int | None = None, overwrite: bool = False,
            progress: bool = True, console=None) -> DataStageResult:
    """Caption every row of `dataset` into the folder `out` (made, finished or grown). Options left as None come
    from the preset. Run it in every process of a launch; each captions its share of the shards. The result
    counts the rows with an error in the whole folder (first_error: the first of them)."""
    from popyou_cli.third_party import load_captioner

    p = P.resolve(P.get_preset(P.CAPTION_PRESETS, preset, stage=STAGE), model=model, prompt=prompt,
                  max_new_tokens=max_new_tokens, num_beams=num_beams, batch_size=batch_size,
                  shard_size=shard_size, dtype=dtype)
    workers = default_workers() if workers is None else workers
    _check(p, workers)
    dataset, image_column = stage_input(dataset, out, image_column=image_column, device=device, workers=workers,
                                        progress=progress, console=console)
    ds = open_input(dataset, out, stage=STAGE, image_column=image_column)
    run = DataStage(STAGE, device, p.dtype)
    # What changes a caption; batch size, device, workers only change speed and are left out (store.py refuses
    # to continue a folder made with other settings).
    settings = {"model": p.model, "prompt": p.prompt or "", "max_new_tokens": p.max_new_tokens,
                "num_beams": p.num_beams, "dtype": run.dtype_name, "image_column": image_column}
    specs = run.open(out, parent=dataset, settings=settings, features=features(), n_rows=len(ds),
                     shard_size=p.shard_size, overwrite=overwrite)
    if specs:  # a finished folder does not even load the model
        net, processor = load_captioner(p.model, device=run.device, dtype=run.dtype)
        batches = loader(undecoded(ds.select_columns([image_column]), image_column), Prepare(image_column),
                         Collate(processor, p.prompt), shard_batches(specs, p.batch_size), workers,
                         pin_memory=run.device.type == "cuda")
        with run.running(progress, console) as advance:
            run.write_in_shards(caption_batches(batches, net, processor, max_new_tokens=p.max_new_tokens,
                                                num_beams=p.num_beams, device=run.device, dtype=run.dtype), advance)
    return run.finish("caption_error", what="captioned", details=p.model)
