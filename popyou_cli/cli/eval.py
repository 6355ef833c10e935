"""`popyou eval`: parse options, check them, call the stage. Short help here; docs/cli.md has every option."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from popyou_cli.cli.common import (P_OUTPUT, P_SAMPLING, cfg_scales_option, check_prompt_file, console,
                                   device_option, dtype_option, fast_option, loading, pipeline_at, pipeline_option,
                                   progress_every_option, quantize_option, revision_option, user_errors)
from popyou_cli.core.bounds import check_eval_options
from popyou_cli.core.errors import PopyouError
from popyou_cli.core.progress import set_progress_every
from popyou_cli.core.formats import METRICS_JSON

P_DATA, P_METRICS = "Data", "Metrics"


@user_errors
def eval_cmd(
    pipeline: Optional[str] = pipeline_option("Pipeline folder or Hub spec. Default: $POPYOU_PIPELINE, else the "
                                              "original model (give --data)."),
    revision: Optional[str] = revision_option(),
    images: Optional[Path] = typer.Option(None, "--images", metavar="DIR", show_default=False, rich_help_panel=P_DATA,
                                          help="Score this 'popyou sample' folder as it is; nothing is generated."),
    data: Optional[Path] = typer.Option(None, "--data", metavar="DIR", show_default=False, rich_help_panel=P_DATA,
                                        help="The encode folder trained on. Default: the one the pipeline names."),
    reference: Optional[Path] = typer.Option(None, "--reference", metavar="DIR", show_default=False,
                                             rich_help_panel=P_DATA, help="FID/KID reference images. Default: the "
                                             "training rows of --data."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", metavar="FILE", show_default=False,
                                               rich_help_panel=P_DATA, help="These prompts (one a line) instead of "
                                               "the held-out rows'."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", show_default=False, rich_help_panel=P_DATA,
                                                 help="Held-out fraction. Default: train-adapter's."),
    allow_other_data: bool = typer.Option(False, "--allow-other-data", rich_help_panel=P_DATA,
                                          help="Score on --data even without the rows trained on."),
    n_prompts: int = typer.Option(64, "--n-prompts", rich_help_panel=P_SAMPLING, help="Prompts to generate, one "
                                  "image each."),
    seed: int = typer.Option(0, "--seed", rich_help_panel=P_SAMPLING, help="Image k uses seed + k."),
    cfg: Optional[float] = typer.Option(None, "--cfg", show_default=False, rich_help_panel=P_SAMPLING,
                                        help="Guidance. Default: the pipeline's."),
    top_k: Optional[int] = typer.Option(None, "--top-k", show_default=False, rich_help_panel=P_SAMPLING,
                                        help="Top-k. Default: the pipeline's."),
    top_p: Optional[float] = typer.Option(None, "--top-p", show_default=False, rich_help_panel=P_SAMPLING,
                                          help="Top-p. Default: the pipeline's."),
    inception: Optional[Path] = typer.Option(None, "--inception", metavar="FILE", show_default=False,
                                             rich_help_panel=P_METRICS, help="A TorchScript FID network. Default: "
                                             "TF-Inception, offline."),
    siglip_fid: bool = typer.Option(False, "--siglip-fid", rich_help_panel=P_METRICS, help="Also FID in SigLIP "
                                    "space."),
    max_reference: int = typer.Option(2000, "--max-reference", rich_help_panel=P_METRICS, help="Reference images "
                                      "for FID/KID, at most."),
    out: Path = typer.Option(Path("eval"), "--out", rich_help_panel=P_OUTPUT, help="Folder for metrics.json, the "
                             "report, grid.png and images/."),
    overwrite: bool = typer.Option(False, "--overwrite", rich_help_panel=P_OUTPUT, help="Write into a folder popyou "
                                   "did not write; only eval's own files are replaced."),
    device: str = device_option(),
    dtype: str = dtype_option("auto: bf16 on CUDA, fp32 on CPU."),
    quantize: Optional[str] = quantize_option(),
    cfg_scales: Optional[int] = cfg_scales_option(),
    fast: bool = fast_option(),
    batch_size: int = typer.Option(8, "--batch-size", rich_help_panel="Speed", help="Images made together."),
    progress_every: Optional[float] = progress_every_option(),
):
    """Score a pipeline: SigLIP score, FID/KID, held-out NLL, a report.

    SigLIP text-image score, FID/KID against the training images, held-out NLL with right against shuffled
    conditioning, images/s; report.md and report.html say what the numbers mean. Examples:
    popyou eval --pipeline runs/txt/pipeline --out eval/ ;
    popyou eval --images samples/ --reference data/funko --out eval-samples/"""
    set_progress_every(progress_every)
    check_eval_options(n_prompts=n_prompts, batch_size=batch_size, seed=seed, max_reference=max_reference, cfg=cfg,
                       top_k=top_k, cfg_scales=cfg_scales)
    prompt_file = check_prompt_file(prompt_file, "eval")
    weights = str(inception) if inception else None
    loading(str(images) if images is not None else pipeline or "the original PopYOU model")
    if images is not None:
        if prompt_file is not None or data is not None:
            raise PopyouError("--images scores existing images: drop --prompt-file/--data (give FID's --reference)")
        if quantize is not None or cfg_scales is not None or fast:
            raise PopyouError("--images scores existing images, nothing is sampled: drop --quantize/--cfg-scales/--fast")
        from popyou_cli.eval.evaluate import evaluate_images

        res = evaluate_images(images=images, out=out, reference=reference, pipeline=pipeline, device=device,
                              dtype=dtype, inception=weights, siglip_fid=siglip_fid, max_reference=max_reference,
                              overwrite=overwrite, console=console)
    else:
        pipeline = pipeline_at(pipeline, revision)
        if pipeline is None and data is None:
            raise PopyouError("eval needs --pipeline (made by 'popyou train-adapter'; see the README quick-start), "
                              "or --data ENCODE_FOLDER to score the original model on it, or --images DIR to score "
                              "a 'popyou sample' folder")
        from popyou_cli.eval.evaluate import evaluate
        from popyou_cli.infer.options import SamplingOptions

        if pipeline is None:
            from popyou_cli.infer.resolve import default_pipeline

            pipeline = default_pipeline()
        opts = SamplingOptions(cfg=cfg, top_k=top_k, top_p=top_p, cfg_scales=cfg_scales)
        res = evaluate(pipeline=pipeline, out=out, data=data, prompt_file=prompt_file, n_prompts=n_prompts,
                       batch_size=batch_size, seed=seed, opts=opts, device=device, dtype=dtype, quantize=quantize,
                       inception=weights, siglip_fid=siglip_fid, val_fraction=val_fraction,
                       max_reference=max_reference, reference=reference, console=console, fast=fast,
                       allow_other_data=allow_other_data, overwrite=overwrite)
    from popyou_cli.eval.report import summary_line

    console.print(summary_line(res), highlight=False, markup=False)
    console.print(f"wrote {out}/metrics.json and the report {out}/report.html", highlight=False, markup=False)
    typer.echo(str(out / METRICS_JSON))
