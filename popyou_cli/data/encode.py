"""`popyou encode`: everything training needs from an image and its texts, computed once.

Per row:
- `codes`: VAR's VQ-VAE tokens of the image, all scales in one int16 column (scale order, row-major in each
  scale: 680 codes for the official patch_nums). The image is resized to `resize` on the short side (Lanczos) and
  centre-cropped to the VQ-VAE's size (288 -> 256 for the official model, 72 -> 64 for the tiny one), mapped to
  [-1, 1], as in the original recipe. `codes_flip` (optional): the same for the horizontally flipped crop.
- `siglip_image`: the SigLIP (open_clip) image embedding, preprocessed as the model defines, L2-normalised.
- `siglip_text_<column>`: the text embedding of each chosen text column (default: prompt and caption when
  present), L2-normalised.
- `encode_error`: "" when every column of the row is valid. Otherwise the reasons, and the invalid columns hold
  placeholders of the right length (codes -1, embeddings 0): an unreadable image (images.open_rgb) or an empty
  text (e.g. a row whose caption failed). The row is never dropped; the count is reported at the end.

The manifest's settings record patch_nums, the VQ-VAE spec, sizes, the SigLIP model, tag and width, the text
columns and flip: what the training stages need to read the columns back.

Images are decoded and preprocessed, and texts tokenised, in DataLoader worker processes; the main process runs
the VQ-VAE (always fp32: the nearest-code search must not depend on rounding), SigLIP (autocast on CUDA) and
writes shards. Resume and several processes work as in gen-data and caption (store.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from popyou_cli.core import presets as P
from popyou_cli.core.bounds import MAX_BATCH, check_int
from popyou_cli.data.runner import (DataStage, DataStageResult, check_at_least_1, check_workers, default_workers, loader,
                         open_image, open_input, shard_batches, undecoded)
from popyou_cli.core.devices import autocast, parse_dtype
from popyou_cli.data.import_images import stage_input
from popyou_cli.core.errors import PopyouError, short_error
from popyou_cli.core.images import default_resize, resize_center_crop, to_pm1

STAGE = "encode"
EMBED_DTYPES = ("float16", "float32")
DOWNSAMPLE = 16  # VAR's VQ-VAEs (official and tiny) shrink images 16x: image size = patch_nums[-1] * 16
PATCH_NUMS_BY_SIZE = {256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
                      64: (1, 2, 3, 4)}
DEFAULT_TEXT_COLUMNS = ("prompt", "caption")


def text_feature_name(column: str) -> str:
    return f"siglip_text_{column}"


def features(n_codes: int, dim: int, text_columns: Sequence[str], flip: bool, embed_dtype: str):
    import datasets

    codes = datasets.Sequence(datasets.Value("int16"), length=n_codes)
    emb = datasets.Sequence(datasets.Value(embed_dtype), length=dim)
    cols = {"index": datasets.Value("int64"), "codes": codes}
    if flip:
        cols["codes_flip"] = codes
    cols["siglip_image"] = emb
    cols.update({text_feature_name(c): emb for c in text_columns})
    cols["encode_error"] = datasets.Value("string")
    return datasets.Features(cols)


class Prepare:
    """In a worker: one row -> (row, VAR crop in [-1, 1] or None, SigLIP pixels or None, texts, error)."""

    def __init__(self, image_column: str, text_columns: Sequence[str], resize: int, size: int, preprocess):
        self.image_column, self.text_columns = image_column, list(text_columns)
        self.resize, self.size, self.preprocess = resize, size, preprocess

    def __call__(self, row: int, cells: dict):
        var = pix = None
        image, error = open_image(cells[self.image_column])
        if image is not None:
            try:
                var = to_pm1(resize_center_crop(image, self.resize, self.size))
                pix = self.preprocess(image)
            except Exception as e:  # noqa: BLE001 - bad data, not a bug: the row keeps placeholders
                var, error = None, f"image preprocessing failed ({short_error(e, 120, with_type=True)})"
        texts = [cells[c] if isinstance(cells[c], str) and cells[c].strip() else None for c in self.text_columns]
        return row, var, pix, texts, error


class Collate:
    """In a worker: prepared rows -> one batch; texts are tokenised here, column by column, in one call each."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items):
        import torch

        rows = [it[0] for it in items]
        good = [k for k, it in enumerate(items) if it[1] is not None]
        var = torch.stack([items[k][1] for k in good]) if good else None
        pix = torch.stack([items[k][2] for k in good]) if good else None
        texts = []  # per text column: (positions with a text, tokens or None)
        for c in range(len(items[0][3])):
            have = [k for k, it in enumerate(items) if it[3][c] is not None]
            texts.append((have, self.tokenizer([items[k][3][c] for k in have]) if have else None))
        return rows, [it[4] for it in items], good, var, pix, texts


class Encoder:
    """The models of the stage on one device, and one batch of a Collate loader -> output columns."""

    def __init__(self, vae, siglip, *, device, dtype, flip: bool, text_columns: Sequence[str], embed_dtype: str):
        self.vae, self.siglip, self.device, self.dtype, self.flip = vae, siglip, device, dtype, flip
        self.text_columns = list(text_columns)
        self.np_dtype = embed_dtype  # numpy spells float16/float32 as datasets does
        self.n_codes = sum(pn * pn for pn in vae.patch_nums)
        self.dim = _embed_dim(siglip)

    def codes(self, var):
        """(B, 3, H, W) in [-1, 1] -> (B, L) int16: the per-scale code maps concatenated in scale order."""
        import torch

        return torch.cat(self.vae.encode_codes(var), dim=1).to(torch.int16).cpu().numpy()

    def _normalised(self, features):
        import torch

        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy().astype(self.np_dtype)

    def __call__(self, batch) -> tuple[list[int], dict]:
        import numpy as np
        import torch

        rows, errors, good, var, pix, texts = batch
        B = len(rows)
        codes = np.full((B, self.n_codes), -1, np.int16)
        flips = np.full((B, self.n_codes), -1, np.int16)
        image = np.zeros((B, self.dim), self.np_dtype)
        with torch.inference_mode():
            if good:
                var = var.to(self.device, non_blocking=True)
                codes[good] = self.codes(var)
                if self.flip:
                    flips[good] = self.codes(var.flip(-1))
                with autocast(self.device, self.dtype):
                    image[good] = self._normalised(self.siglip.encode_image(pix.to(self.device)))
            out = {"codes": list(codes), **({"codes_flip": list(flips)} if self.flip else {}),
                   "siglip_image": list(image)}
            for column, (have, tokens) in zip(self.text_columns, texts):
                emb = np.zeros((B, self.dim), self.np_dtype)
                if have:
                    with autocast(self.device, self.dtype):
                        emb[have] = self._normalised(self.siglip.encode_text(tokens.to(self.device)))
                missing = sorted(set(range(B)) - set(have))
                for k in missing:
                    errors[k] = "; ".join(filter(None, [errors[k], f"empty {column}"]))
                out[text_feature_name(column)] = list(emb)
        out["encode_error"] = errors
        return rows, out


def _embed_dim(siglip) -> int:
    from popyou_cli.third_party import embedding_dim

    return embedding_dim(siglip)


def _pretrained_tag(p: P.EncodePreset, model: str | None, pretrained: str | None) -> str | None:
    """The preset's tag goes with the preset's model only. Another model without a tag gets its single built-in
    tag, resolved here so that the manifest records what ran (load_siglip asks for one when there are several)."""
    from popyou_cli.third_party import is_tiny

    if pretrained is not None or model is None or model == p.siglip_model:
        return pretrained if pretrained is not None else p.siglip_pretrained
    if is_tiny(model) or model.startswith(("hf-hub:", "local-dir:")):
        return None
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model)
    return tags[0] if len(tags) == 1 else None


def _patch_nums(patch_nums, image_size: int | None, preset_patch_nums) -> tuple[int, ...]:
    if patch_nums is None and image_size is not None:
        if image_size not in PATCH_NUMS_BY_SIZE:
            raise PopyouError(f"--image-size {image_size}: give --patch-nums too (known sizes: "
                              f"{', '.join(map(str, PATCH_NUMS_BY_SIZE))})")
        patch_nums = PATCH_NUMS_BY_SIZE[image_size]
    pn = tuple(int(x) for x in (patch_nums or preset_patch_nums))
    if not pn or any(x < 1 for x in pn) or list(pn) != sorted(set(pn)):
        raise PopyouError(f"--patch-nums must be increasing positive integers (got {','.join(map(str, pn))})")
    if image_size is not None and image_size != pn[-1] * DOWNSAMPLE:
        raise PopyouError(f"--image-size {image_size} does not fit --patch-nums ending in {pn[-1]} "
                          f"(the VQ-VAE makes {pn[-1] * DOWNSAMPLE} px images)")
    return pn


def _check(p: P.EncodePreset, size: int, resize: int, workers: int) -> None:
    check_at_least_1(("--batch-size", p.batch_size), ("--shard-size", p.shard_size))
    check_int("--batch-size", p.batch_size, 1, MAX_BATCH)
    if resize < size:
        raise PopyouError(f"--resize {resize} is smaller than the {size} px crop")
    if p.embed_dtype not in EMBED_DTYPES:
        raise PopyouError(f"unknown --embed-dtype '{p.embed_dtype}' (use {', '.join(EMBED_DTYPES)})")
    parse_dtype(p.dtype)  # a misspelt --dtype is refused before the input is read
    check_workers(workers)


def encode(*, dataset: str | Path, out: str | Path, preset: str = "full", siglip_model: str | None = None,
           siglip_pretrained: str | None = None, vqvae: str | None = None,
           patch_nums: Sequence[int] | None = None, image_size: int | None = None, resize: int | None = None,
           text_columns: Sequence[str] | None = None, flip: bool = False, embed_dtype: str | None = None,
           batch_size: int | None = None, shard_size: int | None = None, image_column: str = "image",
           device: str = "auto", dtype: str | None = None, workers: int | None = None, overwrite: bool = False,
           progress: bool = True, console=None) -> DataStageResult:
    """Encode every row of `dataset` into the folder `out` (made, finished or grown). Options left as None come
    from the preset; text_columns None means prompt and caption, those present. Run it in every process of a
    launch. Returns a result like caption's."""
    from popyou_cli.third_party import load_siglip
    from popyou_cli.models.checkpoints import load_vqvae

    p = P.resolve(P.get_preset(P.ENCODE_PRESETS, preset, stage=STAGE), siglip_model=siglip_model, vqvae=vqvae,
                  resize=resize, embed_dtype=embed_dtype, batch_size=batch_size, shard_size=shard_size,
                  dtype=dtype)
    pretrained = _pretrained_tag(p, siglip_model, siglip_pretrained)
    pn = _patch_nums(patch_nums, image_size, p.patch_nums)
    size = pn[-1] * DOWNSAMPLE
    resize = p.resize or default_resize(size)
    workers = default_workers() if workers is None else workers
    _check(p, size, resize, workers)
    dataset, image_column = stage_input(dataset, out, image_column=image_column, device=device, workers=workers,
                                        progress=progress, console=console)
    ds = open_input(dataset, out, stage=STAGE, image_column=image_column, columns=text_columns or ())
    texts = list(text_columns) if text_columns is not None else [c for c in DEFAULT_TEXT_COLUMNS
                                                                   if c in ds.column_names]
    if len(set(texts)) != len(texts):
        raise PopyouError(f"--text-column repeats a column ({', '.join(texts)})")
    run = DataStage(STAGE, device, p.dtype)  # SigLIP's autocast; the VQ-VAE always runs in fp32
    siglip, preprocess, tokenizer = load_siglip(p.siglip_model, pretrained, device=run.device)
    dim = _embed_dim(siglip)
    n_codes = sum(x * x for x in pn)
    settings = {"patch_nums": list(pn), "vqvae": p.vqvae, "image_size": size, "resize": resize,
                "siglip_model": p.siglip_model, "siglip_pretrained": pretrained, "siglip_dim": dim,
                "text_columns": texts, "flip": flip, "image_column": image_column, "embed_dtype": p.embed_dtype,
                "dtype": run.dtype_name, "n_codes": n_codes}
    specs = run.open(out, parent=dataset, settings=settings,
                     features=features(n_codes, dim, texts, flip, p.embed_dtype), n_rows=len(ds),
                     shard_size=p.shard_size, overwrite=overwrite,  # codes int16, embeddings, error text
                     row_bytes=2 * n_codes * (2 if flip else 1) + (1 + len(texts)) * dim * 4 + 256)
    if specs:
        vae = load_vqvae(p.vqvae, pn, device=run.device)
        if vae.config.image_size != size or vae.config.vocab_size > 32767:
            raise PopyouError(f"VQ-VAE {p.vqvae} makes {vae.config.image_size} px images with "
                              f"{vae.config.vocab_size} codes; encode needs {size} px and at most 32767 codes")
        enc = Encoder(vae, siglip, device=run.device, dtype=run.dtype, flip=flip, text_columns=texts,
                      embed_dtype=p.embed_dtype)
        cells = undecoded(ds.select_columns([image_column, *texts]), image_column)
        batches = loader(cells, Prepare(image_column, texts, resize, size, preprocess), Collate(tokenizer),
                         shard_batches(specs, p.batch_size), workers, pin_memory=run.device.type == "cuda")
        with run.running(progress, console) as advance:
            run.write_in_shards((enc(b) for b in batches), advance)
    details = (f"{n_codes} codes of {p.vqvae}, {dim}-d {p.siglip_model} embeddings of the image and of "
               f"{', '.join(texts) or 'no text column'}")
    return run.finish("encode_error", what="encoded", details=details)
