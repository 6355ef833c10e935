"""The inference commands (import, sample, demo): parse options, check them, call one stage function.

Every check that needs no model runs here, before the stage (and torch) is imported: a mistyped option is answered
at once. Short help here; docs/cli.md has every option in full.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from popyou_cli.cli.common import (P_MODEL, P_OUTPUT, P_SAMPLING, cfg_scales_option, check_prompt_file, console,
                                   demo_fast_option, device_option, dtype_option, fast_option, loading, pipeline_at,
                                   pipeline_option, progress_every_option, quantize_option, revision_option,
                                   user_errors)
from popyou_cli.core.bounds import check_demo_options, check_sample_options
from popyou_cli.core.errors import PopyouError
from popyou_cli.core.progress import set_progress_every
from popyou_cli.core.presets import DEFAULT_VAR

_DTYPE_HELP = "auto: bf16 on CUDA, fp32 on CPU."


@user_errors
def import_cmd(
    source: str = typer.Argument(..., metavar="SOURCE", help="The original PopYOU model: a .pth/.ckpt file or a "
                                 "Hub spec."),
    out: Path = typer.Option(..., "--out", help="Pipeline folder to write."),
    filename: Optional[str] = typer.Option(None, "--filename", show_default=False, help="The checkpoint's file "
                                           "in a Hub repo holding several."),
    revision: Optional[str] = typer.Option(None, "--revision", show_default=False, help="Hub branch, tag or "
                                           "commit."),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", show_default=False, help="SigLIP text "
                                               "architecture: Hub id or folder. Default: siglip-base-patch16-224."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", show_default=False, help="Hub id or folder. "
                                            "Default: --text-encoder's."),
    class_id: Optional[int] = typer.Option(None, "--class-id", show_default=False, help="The class the text "
                                           "conditions. Default: the file's, else 578."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
):
    """Make a pipeline folder from the original PopYOU model.

    LoRA merged, bilinear VQ-VAE, adapter, SigLIP text encoder and tokenizer; the folder runs offline afterwards.
    Example: popyou import spaces/AmitIsraeli/PopYou/VARtext_v1.pth --out models/popyou"""
    loading(source)
    from popyou_cli.infer.import_model import import_checkpoint, summary

    res = import_checkpoint(source, out, filename=filename, revision=revision, text_encoder=text_encoder,
                            tokenizer=tokenizer, class_id=class_id, overwrite=overwrite)
    console.print(summary(res), highlight=False, soft_wrap=True)
    typer.echo(str(res["out"]))


@user_errors
def sample_cmd(
    prompts: Optional[list[str]] = typer.Argument(None, metavar="PROMPT", show_default=False,
                                                  help="Text prompt(s), e.g. \"a wizard funko pop\". Leave out "
                                                  "for --class-id."),
    pipeline: Optional[str] = pipeline_option("Pipeline folder or Hub spec. Default: $POPYOU_PIPELINE, else "
                                              "the original PopYOU model."),
    revision: Optional[str] = revision_option(),
    class_id: Optional[int] = typer.Option(None, "--class-id", show_default=False, rich_help_panel=P_MODEL,
                                           help="Sample this class of --var instead of text."),
    var: str = typer.Option(DEFAULT_VAR, "--var", metavar="SPEC", rich_help_panel=P_MODEL, show_default=False,
                            help="VAR for --class-id: file, folder, Hub file or 'tiny'. Default: VAR-d16."),
    vae: Optional[str] = typer.Option(None, "--vae", metavar="SPEC", show_default=False, rich_help_panel=P_MODEL,
                                      help="VQ-VAE for --class-id. Default: the one --var records."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", metavar="FILE", show_default=False,
                                               rich_help_panel=P_SAMPLING, help="Prompts, one per line."),
    n: int = typer.Option(4, "--n", "-n", rich_help_panel=P_SAMPLING, help="Images per prompt."),
    seed: int = typer.Option(0, "--seed", rich_help_panel=P_SAMPLING, help="Image k uses seed + k."),
    cfg: Optional[float] = typer.Option(None, "--cfg", show_default=False, rich_help_panel=P_SAMPLING,
                                        help="Guidance at the last scale. Default: the pipeline's, else 1.5."),
    top_k: Optional[int] = typer.Option(None, "--top-k", show_default=False, rich_help_panel=P_SAMPLING,
                                        help="Keep the k likeliest codes (0: off). Default: pipeline's, else 900."),
    top_p: Optional[float] = typer.Option(None, "--top-p", show_default=False, rich_help_panel=P_SAMPLING,
                                          help="Nucleus mass (0: off). Default: the pipeline's, else 0.96."),
    more_smooth: Optional[bool] = typer.Option(None, "--more-smooth/--no-more-smooth", show_default=False,
                                               rich_help_panel=P_SAMPLING, help="Gumbel-softmax code mixing."),
    alpha: Optional[float] = typer.Option(None, "--alpha", show_default=False, rich_help_panel=P_SAMPLING,
                                          help="Weight of the class embedding."),
    beta: Optional[float] = typer.Option(None, "--beta", show_default=False, rich_help_panel=P_SAMPLING,
                                         help="Weight of the text (0: class only)."),
    beta_sweep: Optional[str] = typer.Option(None, "--beta-sweep", metavar="START:END:N", show_default=False,
                                             rich_help_panel=P_SAMPLING, help="N frames of one seed as beta moves: "
                                             "PNGs, a strip and an MP4."),
    out: Path = typer.Option(Path("samples"), "--out", rich_help_panel=P_OUTPUT, help="Folder for the PNGs, the "
                             "grid and samples.jsonl."),
    overwrite: bool = typer.Option(False, "--overwrite", rich_help_panel=P_OUTPUT, help="Write into a folder popyou "
                                   "did not write; only sample's own files are replaced."),
    device: str = device_option(),
    dtype: str = dtype_option(_DTYPE_HELP),
    quantize: Optional[str] = quantize_option(),
    cfg_scales: Optional[int] = cfg_scales_option(),
    fast: bool = fast_option(),
    batch_size: int = typer.Option(8, "--batch-size", rich_help_panel="Speed", help="Images made together."),
    progress_every: Optional[float] = progress_every_option(),
):
    """Generate images from text (or a class).

    Text: popyou sample "a wizard funko pop" (the original PopYOU model, or --pipeline runs/txt/pipeline).
    Class: popyou sample --class-id 207 --var FoundationVision/var/var_d16.pth. Every option: docs/cli.md."""
    set_progress_every(progress_every)
    check_sample_options(n=n, batch_size=batch_size, seed=seed, alpha=alpha, beta=beta, beta_sweep=beta_sweep,
                         cfg=cfg, top_k=top_k, cfg_scales=cfg_scales)
    prompt_file = check_prompt_file(prompt_file)
    check_prompts_are_not_files(prompts or [])
    if class_id is not None and (prompts or prompt_file or pipeline):
        raise PopyouError("--class-id samples a class with --var/--vae; drop the prompt/--pipeline, or drop --class-id")
    if class_id is None and not prompts and prompt_file is None:
        raise PopyouError("nothing to sample: pass a prompt, e.g. popyou sample \"a wizard funko pop\" "
                          "(or --prompt-file FILE), or --class-id N")
    loading(var if class_id is not None else pipeline or "the original PopYOU model")
    from popyou_cli.infer.options import SamplingOptions, read_prompts

    opts = SamplingOptions(cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth, alpha=alpha, beta=beta,
                           cfg_scales=cfg_scales).check()
    texts = read_prompts(prompts or [], prompt_file, console=console) if class_id is None else []
    if class_id is None and not texts:
        raise PopyouError(f"nothing to sample: {prompt_file} holds no prompt")
    from popyou_cli.infer.sample import sample_classes, sample_text

    if class_id is not None:
        res = sample_classes(var=var, vae=vae, class_id=class_id, n=n, batch_size=batch_size, opts=opts,
                             seed=seed, device=device, dtype=dtype, out=out, quantize=quantize, console=console,
                             fast=fast, overwrite=overwrite)
    else:
        res = sample_text(pipeline=pipeline_at(pipeline, revision), prompts=texts, n=n, batch_size=batch_size,
                          opts=opts, seed=seed, device=device, dtype=dtype, out=out, beta_sweep=beta_sweep,
                          quantize=quantize, console=console, fast=fast, overwrite=overwrite)
    console.print(res.summary(), highlight=False, soft_wrap=True)
    typer.echo(str(res.grid))


PROMPT_FILE_SUFFIXES = (".txt", ".text", ".csv", ".tsv", ".md", ".json", ".jsonl", ".yaml", ".yml")


def check_prompts_are_not_files(prompts: list[str]) -> None:
    """`popyou sample prompts.txt` meant --prompt-file prompts.txt: a prompt that names an existing text file (by
    its suffix or a folder in it) is refused in one line that says so, before minutes go into a picture of the
    words "prompts.txt"."""
    for p in prompts:
        path = Path(p).expanduser()
        if (path.suffix.lower() in PROMPT_FILE_SUFFIXES or "/" in p) and path.is_file():
            raise PopyouError(f"'{p}' is a file, not a prompt: did you mean --prompt-file {p}?")


@user_errors
def demo_cmd(
    pipeline: Optional[str] = pipeline_option("Pipeline folder or Hub spec, as for sample."),
    revision: Optional[str] = revision_option(),
    host: str = typer.Option("127.0.0.1", "--host", rich_help_panel="Server", help="Address to listen on; "
                             "0.0.0.0: every interface (docs/cli.md)."),
    port: int = typer.Option(7860, "--port", rich_help_panel="Server", help="TCP port of the page."),
    share: bool = typer.Option(False, "--share", rich_help_panel="Server", help="Also a public gradio.live link: "
                               "anyone with it uses your machine."),
    device: str = device_option(),
    dtype: str = dtype_option(_DTYPE_HELP),
    quantize: Optional[str] = quantize_option(),
    cfg_scales: Optional[int] = cfg_scales_option(),
    fast: Optional[bool] = demo_fast_option(),
):
    """The original PopYOU Space, locally: a web page.

    A prompt, a beta slider, a seed and a beta video. Loads the models once, then serves until Ctrl+C.
    Example: popyou demo --pipeline runs/txt/pipeline"""
    check_demo_options(port=port, cfg_scales=cfg_scales)
    loading(pipeline or "the original PopYOU model")
    from popyou_cli.infer.demo import run_demo

    run_demo(pipeline=pipeline_at(pipeline, revision), host=host, port=port, share=share, device=device,
             dtype=dtype, quantize=quantize, cfg_scales=cfg_scales, fast=fast, console=console)
