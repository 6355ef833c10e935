"""`popyou import`: the original PopYOU model (a local file or a Hub spec) -> a popyou pipeline folder.

The folder is built in a hidden temporary beside --out and renamed into place, pipeline.json written last, so a
failed import leaves nothing at --out; --out is locked for the write, and --overwrite replaces only a folder
popyou made (store.check_can_replace). original.py reads the file's two layouts.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import torch

from popyou_cli.core import hub
from popyou_cli.core.devices import on_meta
from popyou_cli.core.errors import PopyouError
from popyou_cli.core.formats import PIPELINE_JSON
from popyou_cli.core.presets import DEFAULT_VAE
from popyou_cli.core.files import disk_full_error, sweep_temporaries, temporary_name
from popyou_cli.core.locks import LOCK_FILE, FolderLock
from popyou_cli.infer.original import (_EXPECTS, CHECKPOINT_SUFFIXES, DEFAULT_CLASS_ID, DEFAULT_LORA_ALPHA,
                                       ORIGINAL_SAMPLING, _adapter, _var_state_dict, pick_checkpoint,
                                       read_checkpoint, split_state_dict)
from popyou_cli.infer.folder import PipelineFolder
from popyou_cli.models.adapter import save_adapter
from popyou_cli.models.checkpoints import check_keys, infer_var_config, infer_vqvae_config, save_model
from popyou_cli.models.var import VAR
from popyou_cli.models.vqvae import VQVAE
from popyou_cli.third_party.hf_text import DEFAULT_HF_TEXT_ENCODER, build_hf_text_encoder


def import_checkpoint(source: str | Path, out: str | Path, *, filename: str | None = None, revision: str | None = None,
                      text_encoder: str | None = None, tokenizer: str | None = None, class_id: int | None = None,
                      overwrite: bool = False) -> dict:
    """Reads the original PopYOU model (a local file, or a Hub spec: any repo type, optional file and revision)
    and writes a popyou pipeline folder at `out`. text_encoder: the text tower's architecture (Hub id or folder
    with config.json; None: DEFAULT_HF_TEXT_ENCODER); tokenizer: None means the text encoder's; class_id: the class
    the text conditions (None: the file's start_class_id, else the original demo's 578). Returns a summary."""
    t0 = time.perf_counter()
    out = Path(out).expanduser()
    local = Path(str(source)).expanduser()
    _check_out(out, overwrite, [local] if local.exists() else [])
    sweep_temporaries(out.parent, prefix=f"{out.name}.", locked=False)  # what a killed import left beside --out
    path, prov = _locate(str(source), filename, revision)
    prov["sha256"] = _sha256(path)
    parts, hparams = split_state_dict(read_checkpoint(path), path.name)
    text_encoder = text_encoder or DEFAULT_HF_TEXT_ENCODER
    # first the part that may need the network, so that an offline failure comes before the heavy work
    enc = build_hf_text_encoder(text_encoder, tokenizer or text_encoder, state_dict=parts.pop("text", None))
    lora_alpha = float(hparams.get("lora_alpha", DEFAULT_LORA_ALPHA))

    var_sd, merged = _var_state_dict(parts.pop("var"), lora_alpha)
    var_cfg = infer_var_config(var_sd)
    with on_meta():
        var = VAR(var_cfg)
    check_keys(var, var_sd, "the checkpoint's var.* weights")
    vae_sd = parts.pop("vqvae")
    vae_cfg = infer_vqvae_config(vae_sd, patch_nums=var_cfg.patch_nums)
    vae_cfg.resize = "bilinear"  # the original's quantizer (see the module docstring)
    with on_meta():
        vqvae = VQVAE(vae_cfg)
    check_keys(vqvae, vae_sd, "the checkpoint's vae.* weights")
    adapter = _adapter(parts.pop("adapter"), var_cfg.embed_dim)
    if enc.dim != adapter.config.embed_dim:
        raise PopyouError(f"the text encoder ({text_encoder}) gives {enc.dim}-wide embeddings but the adapter "
                          f"reads {adapter.config.embed_dim}")
    class_id = _class_id(class_id, hparams, var_cfg.num_classes)

    weights = {"var": (var, var_sd), "vqvae": (vqvae, vae_sd)}
    del var, var_sd, vqvae, vae_sd  # _write_folder frees each part once written: the merged VAR is the largest
    with _locked(out):
        pipeline = _write_folder(out, weights, {"provenance": prov, "lora_merged": merged, "lora_alpha": lora_alpha},
                                 adapter, enc, class_id)
    return {"out": out, "pipeline": pipeline, "var": var_cfg, "vqvae": vae_cfg, "adapter": adapter.config,
            "text_encoder_dim": enc.dim, "lora_layers_merged": merged, "seconds": time.perf_counter() - t0}


def _write_folder(out: Path, weights: dict, var_extra: dict, adapter, enc, class_id: int) -> dict:
    """Writes the pipeline folder beside `out` (a hidden temporary), then renames it into place; pipeline.json
    last, so a folder with it is complete. weights: {"var"|"vqvae": (model on meta, state dict)}, popped and
    freed as each is written."""
    prov = var_extra["provenance"]
    tmp = temporary_name(out)
    tmp.mkdir(mode=0o777)  # the umask's mode: the folder is renamed into place as it is
    try:
        var, var_sd = weights.pop("var")
        var.load_state_dict(var_sd, strict=True, assign=True)
        var.init_buffers()
        save_model(var, tmp / "var", var_extra)
        del var, var_sd
        vqvae, vae_sd = weights.pop("vqvae")
        vae_cfg = vqvae.config
        vae_sd["quantize.ema_vocab_hit_SV"] = torch.zeros(len(vae_cfg.patch_nums), vae_cfg.vocab_size)
        vqvae.load_state_dict({k: v.float() for k, v in vae_sd.items()}, strict=True, assign=True)
        save_model(vqvae, tmp / "vqvae", {"provenance": prov})
        del vqvae, vae_sd
        save_adapter(adapter, tmp, {"provenance": prov, "embedding": "text"})
        encoder_entry = enc.save_pretrained(tmp)
        sampling = {"class_id": class_id, **ORIGINAL_SAMPLING}
        pipeline = PipelineFolder.write_config(tmp, {  # last: a folder with it is complete
            "var": "var", "vqvae": "vqvae", "vqvae_resize": "bilinear", "vqvae_encoder": _encoder_source(vae_cfg),
            "encoder": encoder_entry, "adapter": PipelineFolder.adapter_entry(), "sampling": sampling,
            "provenance": prov}).config
        _move_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full_error(e, out.parent) if isinstance(e, Exception) else None
        if full is not None:  # transformers' and torch's writes say it their own way
            raise full from None
        raise
    return pipeline


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """--out's lock for the whole write (a second import into it is refused); a failed import that made --out
    leaves nothing there."""
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out, "--out", "popyou import")
    try:
        yield
    except BaseException:
        if made and not [p for p in out.iterdir() if p.name != LOCK_FILE]:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        lock.release()


def _class_id(given: int | None, hparams: dict, num_classes: int) -> int:
    """--class-id, else the file's start_class_id (Lightning checkpoints), else the original demo's 578."""
    if given is not None:
        class_id, source = given, "--class-id"
    elif "start_class_id" in hparams:
        class_id, source = hparams["start_class_id"], "the file's hyper_parameters.start_class_id"
    else:
        class_id, source = DEFAULT_CLASS_ID, "the original demo's class"
    if isinstance(class_id, bool) or not isinstance(class_id, int) or not 0 <= class_id < num_classes:
        raise PopyouError(f"class {class_id!r} ({source}) is not a class of this VAR (0-{num_classes - 1}); pick one "
                          f"with --class-id")
    return class_id


def _encoder_source(cfg) -> str | None:
    """Where the encoder of a VQ-VAE saved decoder side only lives: the official VQ-VAE holds the same weights (the
    original fine-tuned only VAR), so a stage that must encode images for this pipeline takes it from there. None
    when the file kept its encoder, or its architecture is not the official one."""
    official = (cfg.vocab_size, cfg.z_channels, cfg.ch) == (4096, 32, 160)
    return DEFAULT_VAE if not cfg.has_encoder and official else None


def _check_out(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    if out.is_file():
        raise PopyouError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        if not overwrite:
            raise PopyouError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
        from popyou_cli.store import check_can_replace  # the one rule for what --overwrite may delete

        check_can_replace(out, inputs, made_by=(PIPELINE_JSON,), what="--out")


def _move_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = temporary_name(out)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _locate(source: str, filename: str | None, revision: str | None) -> tuple[Path, dict]:
    """(local checkpoint file, provenance) for a local path or a Hub spec."""
    p = Path(source).expanduser()
    if p.is_dir():
        if PipelineFolder.is_pipeline(p) or ((p / "config.json").is_file() and (p / "model.safetensors").is_file()):
            raise PopyouError(f"{source} is already a popyou folder (pipeline or model folder); use it directly with "
                              f"--pipeline / --var; {_EXPECTS}")
        raise PopyouError(f"{source} is a folder; {_EXPECTS}")
    if p.is_file():
        if filename or revision:
            raise PopyouError("--filename and --revision are for a Hub repo, not a local file")
        # The file's name, not its absolute path: the pipeline folder is uploaded as it is (sha256 identifies it).
        return p, {"kind": "original PopYOU model", "source": p.name, "filename": p.name, "revision": None}
    if source.lower().endswith(CHECKPOINT_SUFFIXES) and hub.parse_spec(source) is None:
        raise PopyouError(f"no such file: {source}")
    ref = hub.require_spec(source, revision)
    if filename and ref.filename and filename != ref.filename:
        raise PopyouError(f"{source} names the file {ref.filename}; --filename {filename} names another")
    ref = ref.file(filename or ref.filename)
    if ref.filename is None:
        listing = hub.list_files(ref)
        ref = ref.file(pick_checkpoint(listing)).at(listing.commit)
    path = hub.download_file(ref, ref.filename)
    return path, {"kind": "original PopYOU model", "source": ref.repo, "repo_type": ref.repo_type,
                  "filename": ref.filename, "revision": ref.revision}


def _sha256(path: Path) -> str:
    from popyou_cli.store.lineage import hash_file  # store's file hash: 8 MiB blocks, regular files only

    return hash_file(path)[0]


def summary(res: dict) -> str:
    """What `popyou import` prints: what was written, and the command to try it."""
    var, vae, adapter = res["var"], res["vqvae"], res["adapter"]
    s = res["pipeline"]["sampling"]
    return (f"import: wrote {res['out']} in {res['seconds']:.1f} s: VAR depth {var.depth} width {var.embed_dim} "
            f"({res['lora_layers_merged']} LoRA layers merged), VQ-VAE {vae.vocab_size} codes (bilinear resize"
            f"{'' if vae.has_encoder else ', decoder side only'}), "
            f"adapter {adapter.embed_dim}->{adapter.hidden_dim}->{adapter.var_dim}, text encoder "
            f"{res['text_encoder_dim']}-wide; defaults class {s['class_id']}, cfg {s['cfg']}, top-p {s['top_p']}, "
            f"beta {s['beta']}. Try: popyou sample \"a wizard funko pop\" --pipeline {res['out']}")
