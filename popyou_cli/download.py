"""`popyou download`: fetch, once, every file the chosen stages need, then prove that each stage loads offline.

What a stage needs comes from its preset (the same settings the stage runs with) and the device and dtype:

  gen-data       the diffusers pipeline (SDXL-Turbo): model_index.json, each component's config, tokenizer and
                 scheduler files, and the weights in the variant the load picks (fp16 files in float16, see
                 `text_to_image_variant`), safetensors only when the repo has them; never the single-file
                 checkpoints at the top of the repo
  caption        the transformers model (BLIP-2): its top-level configs, processor and tokenizer files, the
                 safetensors index and shards
  encode         SigLIP's open_clip weights and its Hugging Face tokenizer, and the VQ-VAE
  finetune       the starting VAR and the VQ-VAE
  train-adapter  the VQ-VAE (and the VAR when the preset names one) and SigLIP (the pipeline it writes uses it)
  sample         the pipeline (default: the demo Space's VARtext_v1.pth, plus the SigLIP text config and tokenizer
                 it is imported with; imported once into popyou's cache)
  eval           SigLIP (the judge) and the pipeline when --pipeline is given

Files go through the Hugging Face cache on its main branch (what a later offline load looks up) with
huggingface_hub's progress bar; files already there are not fetched again. The check then runs every stage's
loaders in a fresh process with HF_HUB_OFFLINE=1 (`python -m popyou_cli.download PLAN.json`), one stage at a
time, freeing memory between them: what loads there loads in every later offline run.

Hub access goes through popyou_cli.core.hub (`file_sizes`, `download_file`); a `Fetch.repo` is a Hub spec as users
write it (`spaces/OWNER/NAME` for a Space), so the repo type travels with it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from popyou_cli.core import hub
from popyou_cli.core import presets as P
from popyou_cli.core.errors import PopyouError

STAGES = ("gen-data", "caption", "encode", "finetune", "train-adapter", "sample", "eval")
_DOCS = (".md", ".gitattributes", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".mp4", ".py")
_WEIGHTS = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".onnx_data", ".ot",
            ".gguf", ".tflite", ".pb", ".mlmodel")
_VARIANTS = ("fp16", "bf16", "fp32", "non_ema", "ema")


@dataclass
class Fetch:
    """Files of one Hub repo that a stage needs. kind: diffusers | transformers | tokenizer | files."""
    stage: str
    repo: str
    kind: str
    files: list = field(default_factory=list)  # kind "files": names; a tuple = the first of them the repo has
    dtype: str = "fp32"  # diffusers: picks the weight variant
    chosen: dict[str, int | None] = field(default_factory=dict)  # file -> size, once the repo is listed


@dataclass
class Plan:
    fetches: list[Fetch] = field(default_factory=list)
    pipelines: list[tuple[str, str]] = field(default_factory=list)  # (stage, pipeline spec)
    checks: list[dict] = field(default_factory=list)  # JSON: what the offline check loads
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ what stages need
def _weights_spec(spec: str | None, kind: str) -> tuple[str, list] | None:
    """(repo, files) of a VAR / VQ-VAE weights spec on the Hub (None: tiny, a local path or nothing)."""
    from popyou_cli.core.presets import OFFICIAL_REPO, TINY
    from popyou_cli.models.checkpoints import _OFFICIAL_DEFAULT_FILE

    if not spec or spec == TINY or Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")):
        return None
    parts = spec.strip("/").split("/")
    if len(parts) < 2:
        return None
    repo = "/".join(parts[:2])
    if len(parts) > 2:
        return repo, ["/".join(parts[2:])]
    return repo, [_OFFICIAL_DEFAULT_FILE[kind]] if repo == OFFICIAL_REPO else ["config.json", "model.safetensors"]


def _siglip_needs(plan: Plan, stage: str, model: str, pretrained: str | None) -> None:
    from popyou_cli.third_party.common import is_tiny
    from popyou_cli.third_party.siglip import TINY_SIGLIP_NAME, open_clip_text_config, open_clip_weight_files

    if is_tiny(model) or model == TINY_SIGLIP_NAME or model.startswith("local-dir:"):
        return
    repo, files = open_clip_weight_files(model, pretrained)
    if repo is not None:
        plan.fetches.append(Fetch(stage, repo, "files", files))
    if model.startswith("hf-hub:"):  # its tokenizer is named in the config it ships: fetch that first
        hub.download_file(repo, "open_clip_config.json")
    tokenizer = open_clip_text_config(model).get("hf_tokenizer_name")
    if tokenizer and not Path(tokenizer).expanduser().is_dir():
        plan.fetches.append(Fetch(stage, tokenizer, "tokenizer"))
    plan.checks.append({"stage": stage, "load": "siglip", "model": model, "pretrained": pretrained})


def _weights_needs(plan: Plan, stage: str, spec: str | None, kind: str) -> None:
    found = _weights_spec(spec, kind)
    if found:
        plan.fetches.append(Fetch(stage, found[0], "files", found[1]))
        plan.checks.append({"stage": stage, "load": kind, "spec": spec})


def _pipeline_needs(plan: Plan, stage: str, spec: str | None) -> None:
    """A pipeline on the Hub. One that names the original model's file needs the file, then its text encoder's
    config and tokenizer (the import builds the text tower from them); both show with their sizes."""
    from popyou_cli.third_party.hf_text import DEFAULT_HF_TEXT_ENCODER
    from popyou_cli.infer.resolve import default_pipeline

    spec = spec or default_pipeline()
    if Path(spec).expanduser().exists():
        return
    ref = hub.require_spec(spec, what="a pipeline folder or a Hub repo")
    if ref.filename:
        plan.fetches.append(Fetch(stage, str(ref.file(None)), "files", [ref.filename]))
        plan.fetches.append(Fetch(stage, DEFAULT_HF_TEXT_ENCODER, "files", ["config.json"]))
        plan.fetches.append(Fetch(stage, DEFAULT_HF_TEXT_ENCODER, "tokenizer"))
    plan.pipelines.append((stage, spec))
    plan.checks.append({"stage": stage, "load": "pipeline", "spec": spec})


def make_plan(stages: list[str], *, preset: str = "full", pipeline: str | None = None, device=None,
              dtype: str = "auto") -> Plan:
    from popyou_cli.core.devices import dtype_name, resolve_dtype
    from popyou_cli.third_party.common import is_tiny
    from popyou_cli.core.presets import DEFAULT_VAE

    plan = Plan()
    for stage in stages:
        if stage == "gen-data":
            p = P.get_preset(P.GEN_DATA_PRESETS, preset, stage=stage)
            if not is_tiny(p.model):
                dt = dtype_name(resolve_dtype(dtype if dtype != "auto" else p.dtype, device, "data"))
                plan.fetches.append(Fetch(stage, p.model, "diffusers", dtype=dt))
                plan.checks.append({"stage": stage, "load": "text_to_image", "model": p.model, "dtype": dt})
        elif stage == "caption":
            p = P.get_preset(P.CAPTION_PRESETS, preset, stage=stage)
            if not is_tiny(p.model):
                dt = dtype_name(resolve_dtype(dtype if dtype != "auto" else p.dtype, device, "data"))
                plan.fetches.append(Fetch(stage, p.model, "transformers"))
                plan.checks.append({"stage": stage, "load": "captioner", "model": p.model, "dtype": dt})
        elif stage == "encode":
            p = P.get_preset(P.ENCODE_PRESETS, preset, stage=stage)
            _siglip_needs(plan, stage, p.siglip_model, p.siglip_pretrained)
            _weights_needs(plan, stage, p.vqvae, "vqvae")
        elif stage in ("finetune", "train-adapter"):
            presets = P.FINETUNE_PRESETS if stage == "finetune" else P.ADAPTER_PRESETS
            p = P.get_preset(presets, preset, stage=stage)
            _weights_needs(plan, stage, getattr(p, "var", None), "var")
            _weights_needs(plan, stage, None if preset == "tiny" else DEFAULT_VAE, "vqvae")
            if stage == "train-adapter" and preset != "tiny":
                e = P.get_preset(P.ENCODE_PRESETS, preset, stage=stage)
                _siglip_needs(plan, stage, e.siglip_model, e.siglip_pretrained)
        elif stage in ("sample", "eval"):
            if stage == "eval" and preset != "tiny":
                _siglip_needs(plan, stage, P.DEFAULT_SIGLIP, P.DEFAULT_SIGLIP_PRETRAINED)
            if preset != "tiny" and (stage == "sample" or pipeline):
                _pipeline_needs(plan, stage, pipeline)
        else:
            raise PopyouError(f"unknown stage '{stage}' (use: {', '.join(STAGES)})")
    if not plan.fetches and not plan.pipelines:
        plan.notes.append(f"nothing to download: the {', '.join(stages)} stage(s) of the '{preset}' preset use no "
                          "Hub files")
    return plan


# ------------------------------------------------------------------------------------------ choosing files
def _is_weight(name: str) -> bool:
    return name.endswith(_WEIGHTS) or ".safetensors.index" in name or ".bin.index" in name


def _variant_of(name: str) -> str | None:
    return next((v for v in _VARIANTS if f".{v}." in Path(name).name), None)


def pick_weights(files: list[str], variant: str | None) -> list[str]:
    """The weight files a load reads among `files` (one folder): safetensors when there are any (else .bin),
    the `variant` ones when there are any (else the plain ones), with their shard index."""
    for ext in (".safetensors", ".bin"):
        group = [f for f in files if f.endswith(ext) or f"{ext}.index" in f]
        if group:
            break
    else:
        return []
    wanted = [f for f in group if _variant_of(f) == variant] if variant else []
    return wanted or [f for f in group if _variant_of(f) is None]


def choose_files(fetch: Fetch, sizes: dict[str, int | None]) -> dict[str, int | None]:
    """The files of `fetch` (with sizes) among its repo's `sizes`."""
    names = list(sizes)
    if fetch.kind == "files":
        out = []
        for entry in fetch.files:
            options = (entry,) if isinstance(entry, str) else tuple(entry)
            have = [o for o in options if o in sizes]
            if not have:
                raise PopyouError(f"{fetch.stage}: the Hub repo '{fetch.repo}' has no {' or '.join(options)}")
            out.append(have[0])
    elif fetch.kind == "tokenizer":
        from popyou_cli.third_party.siglip import tokenizer_files

        out = tokenizer_files(names)
        if not out:
            raise PopyouError(f"{fetch.stage}: the Hub repo '{fetch.repo}' holds no tokenizer files")
    elif fetch.kind == "transformers":
        top = [f for f in names if "/" not in f and not f.endswith(_DOCS)]
        out = [f for f in top if not _is_weight(f)] + pick_weights(top, None)
    else:  # diffusers
        out = _diffusers_files(fetch, names)
    return {name: sizes.get(name) for name in out}


def _diffusers_files(fetch: Fetch, names: list[str]) -> list[str]:
    from popyou_cli.third_party.sdxl import FP16_VARIANT

    if "model_index.json" not in names:
        raise PopyouError(f"{fetch.stage}: the Hub repo '{fetch.repo}' is not a diffusers pipeline "
                          "(no model_index.json)")
    index = json.loads(Path(hub.download_file(fetch.repo, "model_index.json")).read_text())
    # the loader's rule (text_to_image_variant): fp16 files in float16 when the repo has any
    variant = FP16_VARIANT if fetch.dtype == "fp16" and any(_variant_of(n) == FP16_VARIANT for n in names) else None
    out = ["model_index.json"]
    for part, spec in index.items():
        if part.startswith("_") or not isinstance(spec, list) or spec[-1] is None:
            continue
        inside = [n for n in names if n.startswith(f"{part}/") and not n.endswith(_DOCS)]
        out += [n for n in inside if not _is_weight(n)] + pick_weights(inside, variant)
    return out


# ------------------------------------------------------------------------------------------ running
def human_size(n: int | None) -> str:
    if n is None:
        return "? B"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def _cached(repo: str, name: str) -> bool:
    return hub.cached_file(hub.require_spec(repo), name) is not None


def download(*, stages: list[str] | None = None, preset: str = "full", pipeline: str | None = None,
             device: str = "auto", dtype: str = "auto", check: bool = True, dry_run: bool = False,
             console=None) -> Plan:
    """Fetch what `stages` (default: all) need; then, unless check is False, load each offline in a child."""
    from rich.console import Console

    from popyou_cli.core.devices import resolve_device
    from popyou_cli.infer.resolve import resolve_pipeline

    console = console or Console(stderr=True)
    stages = list(stages or STAGES)
    dev = resolve_device(device)
    plan = make_plan(stages, preset=preset, pipeline=pipeline, device=dev, dtype=dtype)
    for note in plan.notes:
        console.print(note)
    if not plan.fetches and not plan.pipelines:
        return plan
    if hub.offline_mode():
        raise PopyouError("popyou download needs the Hub: unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE)")
    todo: list[tuple[str, str, int | None]] = []
    for fetch in plan.fetches:
        fetch.chosen = choose_files(fetch, hub.file_sizes(hub.require_spec(fetch.repo)))
        new = {n: s for n, s in fetch.chosen.items() if not _cached(fetch.repo, n)}
        total, fresh = sum(s or 0 for s in fetch.chosen.values()), sum(s or 0 for s in new.values())
        files = f"{len(fetch.chosen)} file{'s' if len(fetch.chosen) != 1 else ''}"
        console.print(f"{fetch.stage:<13} {fetch.repo}: {files}, {human_size(total)}"
                      + (f" ({human_size(fresh)} to fetch)" if new else " (all in the cache)"), soft_wrap=True)
        todo += [(fetch.repo, n, s) for n, s in new.items() if (fetch.repo, n) not in {(r, f) for r, f, _ in todo}]
    for stage, spec in plan.pipelines:
        console.print(f"{stage:<13} pipeline {spec} (imported once into popyou's cache)", soft_wrap=True)
    console.print(f"to fetch: {len(todo)} files, {human_size(sum(s or 0 for _, _, s in todo))}")
    if dry_run:
        return plan
    for k, (repo, name, size) in enumerate(todo, 1):
        console.print(f"[{k}/{len(todo)}] {repo}/{name} ({human_size(size)})", soft_wrap=True)
        hub.download_file(hub.require_spec(repo), name)  # as named (main by default): what offline loads look up
    for stage, spec in plan.pipelines:
        console.print(f"{stage}: pipeline {spec} -> {resolve_pipeline(spec)}", soft_wrap=True)
    if check and plan.checks:
        check_offline(plan.checks, device=str(dev), console=console)
    return plan


def check_offline(checks: list[dict], *, device: str, console) -> None:
    """Load every stage's models in a fresh process with the Hub switched off; a PopyouError when one fails."""
    console.print("checking that every stage loads offline (HF_HUB_OFFLINE=1), one at a time ...")
    with tempfile.TemporaryDirectory(prefix="popyou-download-") as tmp:
        plan_file = Path(tmp) / "checks.json"
        plan_file.write_text(json.dumps({"device": device, "checks": checks}))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "popyou_cli.download", str(plan_file)], env=env,
                              capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("ok ", "FAILED "))]
    for line in lines:
        console.print(line, soft_wrap=True, markup=False)
    if proc.returncode != 0:
        failed = [line for line in lines if line.startswith("FAILED")]
        detail = failed[0] if failed else (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PopyouError(f"a stage does not load offline after the download: {detail}")


def _load(check: dict, device: str) -> str:
    """Load what one check names (in this process, offline); returns what was loaded, for the report."""
    load = check["load"]
    if load == "text_to_image":
        from popyou_cli.third_party import load_text_to_image

        from popyou_cli.core.devices import parse_dtype
        from popyou_cli.third_party.sdxl import text_to_image_variant

        load_text_to_image(check["model"], device=device, dtype=check["dtype"])
        variant = text_to_image_variant(check["model"], parse_dtype(check["dtype"]))
        return f"{check['model']} ({check['dtype']}{f', {variant} weights' if variant else ''})"
    if load == "captioner":
        from popyou_cli.third_party import load_captioner

        load_captioner(check["model"], device=device, dtype=check["dtype"])
        return f"{check['model']} ({check['dtype']})"
    if load == "siglip":
        from popyou_cli.third_party import load_siglip

        _, _, tokenizer = load_siglip(check["model"], check["pretrained"], device=device)
        tokenizer(["a funko pop figure"])
        return f"{check['model']}{' ' + check['pretrained'] if check['pretrained'] else ''} and its tokenizer"
    if load in ("var", "vqvae"):
        from popyou_cli.models.checkpoints import load_var, load_vqvae

        (load_var if load == "var" else load_vqvae)(check["spec"], device=device)
        return f"{load} {check['spec']}"
    from popyou_cli.infer.pipeline import Pipeline

    Pipeline.from_pretrained(check["spec"], device=device)
    return f"pipeline {check['spec']}"


def _run_checks(plan_file: str) -> int:
    import gc

    import torch

    spec = json.loads(Path(plan_file).read_text())
    failed = 0
    for check in spec["checks"]:
        t0 = time.perf_counter()
        try:
            what = _load(check, spec["device"])
            print(f"ok {check['stage']}: {what} ({time.perf_counter() - t0:.1f} s)", flush=True)
        except PopyouError as e:  # a loader's one-line message; anything else is a bug: its traceback shows
            failed += 1
            print(f"FAILED {check['stage']}: {e}", flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":  # the offline check's child process (see check_offline)
    sys.exit(_run_checks(sys.argv[1]))
