"""`popyou eval`: how good a text-to-image pipeline is, in numbers and in pictures.

Prompts default to the held-out rows of the pipeline's training data (the same fixed split train-adapter used).
Metrics: SigLIP text-image score of the generated images (and of the dataset's own images, the reference point),
FID and KID against the training images with the standard Inception network (optionally in SigLIP space too),
held-out next-scale NLL with the right vs shuffled conditioning, and generation speed.
Writes metrics.json, report.md and report.html (prompt / image pairs) into the output folder.
"""
from __future__ import annotations

import html
import json
import time
from pathlib import Path

import numpy as np
import torch

from .. import metrics, runtime
from ..errors import PopyouError
from ..presets import ADAPTER_PRESETS, get_preset
from .sample import SamplingOptions, _check_disk, _generate


def _held_out(pipe, data: Path, val_fraction: float | None, console):
    """(held-out rows for the NLL, their dataset row positions, the joined dataset, the embedding column)."""
    from ..store import load_stage
    from ..training import load_encoded
    from .train_adapter import split_rows

    train = pipe.config.get("train", {})
    if val_fraction is None:
        val_fraction = train.get("val_fraction")
    if val_fraction is None:
        val_fraction = get_preset(ADAPTER_PRESETS, train.get("preset", "full"), stage="eval").val_fraction
    enc = pipe.config.get("encoder", {})
    column = "siglip_image" if enc.get("embedding", "image") == "image" else f"siglip_text_{enc.get('text_field') or 'prompt'}"
    loaded = load_encoded(data, for_stage="eval", columns=[column], patch_nums=pipe.var.config.patch_nums, console=console)
    rows = loaded["rows"]
    rows["_pos"] = torch.arange(len(rows["codes"]))
    train_rows, val_rows = split_rows(rows, val_fraction)
    if val_rows is None:
        raise PopyouError("the pipeline was trained with no held-out rows (val_fraction 0); pass --val-fraction "
                          "or --prompts FILE")
    ds = load_stage(data)
    pos = val_rows.pop("_pos").numpy()
    train_pos = train_rows.pop("_pos").numpy()
    return val_rows, loaded["index"][pos], loaded["index"][train_pos], ds, column


def _dataset_images(ds, indices, image_size: int) -> torch.Tensor:
    """Dataset images by row index, resized and centre-cropped as encode does, as (N, H, W, 3) uint8."""
    from ..images import open_rgb, resize_center_crop

    out = []
    for i in indices:
        img, _ = open_rgb(ds[int(i)]["image"])
        if img is None:  # an undecodable row: it stays out of the reference set
            continue
        out.append(torch.from_numpy(np.asarray(resize_center_crop(img, image_size * 9 // 8, image_size)).copy()))
    if not out:
        raise PopyouError("no decodable dataset images to compare with")
    return torch.stack(out)


def _siglip_image_embeddings(model, preprocess, images_u8: torch.Tensor, device) -> torch.Tensor:
    from PIL import Image

    from ..encoders import encode_images

    pix = torch.stack([preprocess(Image.fromarray(im.numpy())) for im in images_u8]).to(device)
    return encode_images(model, pix).float().cpu()


def evaluate(*, pipeline: str, out: Path, data: Path | None = None, prompts: list[str] | None = None,
             n_prompts: int = 64, batch_size: int = 8, seed: int = 0, opts: SamplingOptions | None = None,
             device: str = "auto", dtype: str = "auto", inception: str | None = None, siglip_fid: bool = False,
             val_fraction: float | None = None, max_reference: int = 2000, console=None) -> dict:
    from ..encoders import encode_texts
    from ..pipeline import load_pipeline
    from .train_adapter import AdapterTrainer, conditioning_eval

    if n_prompts < 2:
        raise PopyouError("--n-prompts must be at least 2 (FID and KID need two images a side)")
    dev = runtime.pick_device(device)
    amp = runtime.pick_dtype(dtype, dev)
    pipe = load_pipeline(pipeline, device=dev)
    opts = (opts or SamplingOptions()).resolve(pipe.sampling, pipe.var.config.vocab_size)
    data = Path(data or pipe.config.get("train", {}).get("data") or "")
    if not str(data) or not data.exists():
        raise PopyouError(f"the training data '{data}' is not there; pass --data ENCODE_FOLDER")
    runtime.ensure_writable_dir(out)
    val_rows, val_index, train_index, ds, column = _held_out(pipe, data, val_fraction, console)
    from_dataset = prompts is None  # only then do the dataset's own images pair with the prompts
    if prompts is None:
        if "prompt" not in ds.column_names:
            raise PopyouError(f"{data} has no 'prompt' column (made by 'popyou gen-data'); pass --prompts FILE")
        prompts = [ds[int(i)]["prompt"] for i in val_index[:n_prompts]]
    if len(prompts) < 2:
        raise PopyouError("eval needs at least 2 prompts")
    image_size = pipe.vqvae.config.image_size
    _check_disk(out, len(prompts), image_size)

    # --- generate, timed
    enc_model, preprocess, tokenizer = pipe.load_encoder(device=dev)
    with torch.no_grad():
        text_emb = encode_texts(enc_model, tokenizer, prompts).float()
        delta = pipe.adapter(text_emb.to(dev))
    s = pipe.sampling
    class_id = int(s.get("class_id", pipe.var.config.num_classes - 1))
    gen, t0 = [], time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(len(prompts), start + batch_size)))
        gen.append(_generate(pipe.var, pipe.vqvae, class_id, [seed + i for i in idx], opts, dev, amp,
                             cond_delta=delta[idx], alpha=s.get("alpha", 1.0), beta=s.get("beta", 1.0)))
    gen = torch.cat(gen)
    images_per_s = len(gen) / (time.perf_counter() - t0)

    # --- reference images and features
    ref_rows = train_index[:max_reference]
    ref = _dataset_images(ds, ref_rows, image_size)
    paired = _dataset_images(ds, val_index[:len(prompts)], image_size) if from_dataset else None
    net = metrics.load_inception(inception, str(dev))
    f_gen, f_ref = metrics.inception_features(gen, net, dev), metrics.inception_features(ref, net, dev)
    kid_size = min(len(f_gen), len(f_ref), 1000)
    kid, kid_std = metrics.kernel_inception_distance(f_gen, f_ref, subset_size=kid_size)
    sig_gen = _siglip_image_embeddings(enc_model, preprocess, gen, dev)
    result = {
        "pipeline": str(pipeline), "data": str(data), "n_prompts": len(prompts), "n_reference_images": len(ref),
        "image_size": image_size, "sampling": {**opts.__dict__, "seed": seed},
        "siglip_score": metrics.mean_cosine(sig_gen, text_emb.cpu()),
        "fid": metrics.frechet_distance(f_gen, f_ref), "kid": kid, "kid_std": kid_std,
        "images_per_s": images_per_s, "device": str(dev),
    }
    if paired is not None and len(paired) == len(prompts):
        result["siglip_score_dataset"] = metrics.mean_cosine(_siglip_image_embeddings(enc_model, preprocess, paired, dev), text_emb.cpu())
    if siglip_fid:
        result["fid_siglip"] = metrics.frechet_distance(sig_gen.double(), _siglip_image_embeddings(enc_model, preprocess, ref, dev).double())
    trainer = AdapterTrainer(pipe.var, pipe.adapter, pipe.vqvae.quantize, class_id, column,
                             s.get("alpha", 1.0), s.get("beta", 1.0), hflip=False)
    result["heldout_nll"] = conditioning_eval(trainer, val_rows, dev)
    _write_report(out, result, prompts, gen)
    return result


def _write_report(out: Path, result: dict, prompts: list[str], images: torch.Tensor) -> None:
    img_dir = out / "images"
    img_dir.mkdir(exist_ok=True)
    names = [runtime.save_png(im, img_dir / f"{i:04d}.png").name for i, im in enumerate(images)]
    runtime.save_png(runtime.grid(images), out / "grid.png")
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    nll = result["heldout_nll"]
    lines = ["# popyou eval", "", f"pipeline `{result['pipeline']}`, data `{result['data']}`", "",
             "| metric | value |", "|---|---|"]
    for key in ("siglip_score", "siglip_score_dataset", "fid", "kid", "fid_siglip", "images_per_s"):
        if key in result:
            lines.append(f"| {key} | {result[key]:.4f} |")
    lines += [f"| held-out NLL, right conditioning | {nll['right']:.4f} |",
              f"| held-out NLL, shuffled conditioning | {nll['shuffled']:.4f} |",
              f"| held-out NLL, class only | {nll['class_only']:.4f} |", "", "![grid](grid.png)", "",
              "| # | prompt | image |", "|---|---|---|"]
    lines += [f"| {i} | {p} | ![{i}](images/{n}) |" for i, (p, n) in enumerate(zip(prompts, names))]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    cells = "".join(f'<figure><img src="images/{n}" width="192"><figcaption>{i}: {html.escape(p)}</figcaption></figure>'
                    for i, (p, n) in enumerate(zip(prompts, names)))
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(v, default=str))}</td></tr>"
                   for k, v in result.items())
    (out / "report.html").write_text(
        "<!doctype html><meta charset=utf-8><title>popyou eval</title>"
        "<style>body{font-family:sans-serif}figure{display:inline-block;width:200px;margin:4px;vertical-align:top}"
        "figcaption{font-size:12px}td{padding:2px 8px}</style>"
        f"<h1>popyou eval</h1><table>{rows}</table><div>{cells}</div>")
