"""The original PopYOU model read into a popyou pipeline folder, and `resolve_pipeline`: a pipeline spec -> a folder.

The original comes in two layouts of the same module (VQ-VAE + VAR with peft LoRA + SigLIP text tower + adapter);
docs/formats.md describes both:
  * the demo Space's `VARtext_v1.pth` (`spaces/AmitIsraeli/PopYou`, the default model): a plain state dict,
    saved after the demo deleted the VQ-VAE's encoder, so it holds no `vae.encoder.*`;
  * a PyTorch Lightning checkpoint of the training module: the same keys under `state_dict`, with the encoder,
    plus `hyper_parameters` (start_class_id, lora_alpha).
Keys, by prefix:
  var.base_model.model.*    VAR wrapped by peft: LoRA merged here as W + (lora_alpha / r) * B @ A
                            (a plain or already merged VAR under var.* is taken as it is)
  vae.*                     the VQ-VAE; the original's quantizer resizes with bilinear, so it is saved with
                            resize "bilinear"; without its encoder it is saved decoder side only
  adapter.*                 norm0 / layer1 / GELU / layer2 / norm2, mapped onto popyou's CondAdapter
  siglip_text_encoder.*     transformers SiglipTextModel weights (optional: else the encoder's own)
The folder is built in a temporary sibling of --out and renamed into place, pipeline.json written last, so a
failed import leaves nothing at --out. Weights are read with torch.load(weights_only=True, mmap=True): popyou
never runs pickled code, and the file is paged in rather than copied.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Iterator

import torch

from . import hub
from .encoders.hf_text import DEFAULT_HF_TEXT_ENCODER, build_hf_text_encoder
from .errors import PopyouError
from .files import atomic_write_json, disk_full_error, sweep_temporaries, temporary_name
from .locks import LOCK_FILE, FolderLock
from .models.adapter import AdapterConfig, CondAdapter, save_adapter
from .models.checkpoints import DEFAULT_VAE, check_keys, infer_var_config, infer_vqvae_config, save_model
from .models.var import VAR
from .models.vqvae import VQVAE

# The model the original demo runs: the demo Space's file (the model repo AmitIsraeli/VARpop holds only a README)
DEFAULT_PIPELINE = "spaces/AmitIsraeli/PopYou/VARtext_v1.pth"
PIPELINE_ENV = "POPYOU_PIPELINE"
DEFAULT_TEXT_ENCODER = DEFAULT_HF_TEXT_ENCODER
DEFAULT_CLASS_ID = 578  # the original demo's class when the checkpoint does not name one
DEFAULT_LORA_ALPHA = 32  # the original's LoraConfig; its checkpoints do not record it
CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".pt", ".safetensors")
PIPELINE_JSON = "pipeline.json"
ORIGINAL_SAMPLING = {"alpha": 1.0, "beta": 1.0, "cfg": 1.5, "top_k": 0, "top_p": 0.9, "more_smooth": False}
_PEFT_PREFIX = "base_model.model."
_PARTS = {"var.": "var", "vae.": "vqvae", "adapter.": "adapter", "siglip_text_encoder.": "text"}
_ADAPTER_NAMES = {"norm0": "norm_in", "layer1": "fc1", "layer2": "fc2", "norm2": "norm_out"}
_EXPECTS = ("import expects the original PopYOU model: the demo Space's VARtext_v1.pth or a Lightning checkpoint "
            "(var.*, vae.*, adapter.* and optionally siglip_text_encoder.* weights)")
_WHERE = (f"the original model is {DEFAULT_PIPELINE} (the demo Space); a local copy imports with "
          "`popyou import FILE --out DIR`")


# ------------------------------------------------------------------------------------------ reading
def read_checkpoint(path: Path) -> dict:
    """The checkpoint as a dict (tensors memory-mapped); one-line errors for anything else."""
    name = path.name
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return {"state_dict": load_file(str(path))}
        except Exception as e:  # noqa: BLE001
            raise PopyouError(f"{name} is not a readable safetensors file ({_first_line(e)}); {_EXPECTS}") from None
    if zipfile.is_zipfile(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001
            refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            if refused or "Weights only load failed" in str(e):
                what = refused[1] if refused else "an object"
                raise PopyouError(f"{name}: torch's safe loader refused to unpickle {what} (popyou never runs pickled "
                                  "code); re-save the checkpoint's state_dict with plain tensors and dicts") from None
            raise PopyouError(f"{name} is a damaged PyTorch checkpoint ({_first_line(e)}); {_EXPECTS}") from None
    if head.startswith(b"PK\x03\x04"):
        raise PopyouError(f"{name} is a truncated or damaged PyTorch checkpoint (a zip archive without its "
                          f"directory); download it again")
    try:  # the legacy (pre-zip) torch.save format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001
        raise PopyouError(f"{name} is not a PyTorch checkpoint (starts with {head[:8]!r}); {_EXPECTS}") from None


def split_state_dict(ckpt, name: str) -> tuple[dict[str, dict], dict]:
    """({part: state dict without its prefix}, hyper_parameters); a one-line error for what is not the original."""
    if not isinstance(ckpt, dict):
        raise PopyouError(f"{name} holds a {type(ckpt).__name__}, not a checkpoint dict; {_EXPECTS}")
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt.get("hyper_parameters"), dict) else {}
    sd = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else ckpt
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        keys = ", ".join(map(str, list(ckpt)[:6]))
        raise PopyouError(f"{name} holds a dict with keys {keys} and no state_dict of tensors; {_EXPECTS}")
    parts: dict[str, dict] = {}
    unknown = []
    for k, v in sd.items():
        prefix = next((p for p in _PARTS if k.startswith(p)), None)
        if prefix is None:
            unknown.append(k)
        else:
            parts.setdefault(_PARTS[prefix], {})[k[len(prefix):]] = v
    if not parts:
        raise PopyouError(f"{name} holds {_describe_bare(sd)}, not the original PopYOU model; {_EXPECTS}")
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise PopyouError(f"{name}: unexpected keys outside var./vae./adapter./siglip_text_encoder. "
                          f"{len(unknown)}: {shown}")
    missing = [p for p, part in (("var.*", "var"), ("vae.*", "vqvae")) if part not in parts]
    if missing:
        raise PopyouError(f"{name} has no {' and no '.join(missing)} weights (found: "
                          f"{', '.join(sorted(parts))}); {_EXPECTS}")
    if "adapter" not in parts:
        raise PopyouError(f"{name} has VAR and VQ-VAE weights but no adapter.* weights (a class-conditional "
                          f"checkpoint, not the text model); {_EXPECTS}")
    return parts, hparams


def _describe_bare(sd: dict) -> str:
    if "class_emb.weight" in sd and any(k.startswith("blocks.") for k in sd):
        return "a plain VAR state dict (like the official var_d16.pth; sample it with `popyou sample --class-id N --var FILE`)"
    if "quantize.embedding.weight" in sd:
        return "a plain VQ-VAE state dict (like the official vae_ch160v4096z32.pth)"
    return f"a state dict with keys like {', '.join(list(sd)[:4])}"


def merge_lora(sd: dict[str, torch.Tensor], lora_alpha: float = DEFAULT_LORA_ALPHA, *,
               in_place: bool = False) -> tuple[dict, int]:
    """peft LoRA keys (`X.base_layer.weight`, `X.lora_A.<name>.weight` (r, in), `X.lora_B.<name>.weight` (out, r))
    -> plain keys with W = W_base + (lora_alpha / r) * B @ A. Returns (state dict, number of merged layers).
    in_place: add into float32 base weights rather than into new tensors. The import passes True: its tensors map
    the file privately (copy-on-write), so the file is never written and a merged page replaces the file's page
    in memory instead of adding a second copy of the VAR (the peak stays under twice the file's size)."""
    out, lora, names = {}, {}, set()
    for k, v in sd.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.([^.]+)\.weight", k)
        if m:
            lora.setdefault(m[1], {})[m[2]] = v
            names.add(m[3])
        elif ".lora_" in k:
            raise PopyouError(f"the VAR holds a LoRA tensor popyou cannot merge: {k} (only Linear LoRA A/B)")
        else:
            out[k.replace(".base_layer.", ".")] = v
    if len(names) > 1:
        raise PopyouError(f"the VAR holds several LoRA adapters ({', '.join(sorted(names))}); import merges one")
    for mod, ab in lora.items():
        w_key = f"{mod}.weight"
        if set(ab) != {"A", "B"} or w_key not in out:
            raise PopyouError(f"incomplete LoRA layer {mod}: needs lora_A, lora_B and base_layer.weight")
        A, B, W = ab["A"], ab["B"], out[w_key]
        r = A.shape[0]
        if B.shape[1] != r or (B.shape[0], A.shape[1]) != tuple(W.shape):
            raise PopyouError(f"LoRA layer {mod}: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit W "
                              f"{tuple(W.shape)}")
        delta = (B.float() @ A.float()) * (lora_alpha / r)  # peft's order: (B @ A) * scaling, then added
        if in_place and W.dtype == torch.float32:
            W.add_(delta)  # the same sum as below, bit for bit
        else:
            out[w_key] = (W.float() + delta).to(W.dtype)
        del delta
    return out, len(lora)


def _var_state_dict(part: dict, lora_alpha: float) -> tuple[dict, int]:
    if all(k.startswith(_PEFT_PREFIX) for k in part):
        part = {k[len(_PEFT_PREFIX):]: v for k, v in part.items()}
    return merge_lora(part, lora_alpha, in_place=True)  # read_checkpoint's tensors: a private mapping


def _adapter(part: dict, var_dim: int) -> CondAdapter:
    """The original's adapter (norm0, layer1, GELU, layer2, norm2) as popyou's CondAdapter; widths from the
    tensors. Keys it does not know keep their name, so the strict check lists them."""
    rename = lambda k: f"{_ADAPTER_NAMES[k.partition('.')[0]]}.{k.partition('.')[2]}"  # noqa: E731
    sd = {rename(k) if k.partition(".")[0] in _ADAPTER_NAMES else k: v for k, v in part.items()}
    try:
        cfg = AdapterConfig(embed_dim=sd["norm_in.weight"].shape[0], var_dim=sd["norm_out.weight"].shape[0],
                            hidden_dim=sd["fc1.weight"].shape[0])
    except KeyError as e:
        raise PopyouError(f"the adapter weights miss {e} (found: {', '.join(sorted(part))})") from None
    if cfg.var_dim != var_dim:
        raise PopyouError(f"the adapter outputs {cfg.var_dim} values but the VAR is {var_dim} wide")
    with torch.device("meta"):
        adapter = CondAdapter(cfg)
    check_keys(adapter, sd, "the checkpoint's adapter.* weights (norm0, layer1, layer2, norm2)")
    adapter.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    return adapter.eval()


# ------------------------------------------------------------------------------------------ import
def import_checkpoint(source: str | Path, out: str | Path, *, filename: str | None = None, revision: str | None = None,
                      text_encoder: str | None = None, tokenizer: str | None = None, class_id: int | None = None,
                      overwrite: bool = False) -> dict:
    """Reads the original PopYOU model (a local file, or a Hub spec: any repo type, optional file and revision)
    and writes a popyou pipeline folder at `out`. text_encoder: the text tower's architecture (Hub id or folder
    with config.json; None: DEFAULT_TEXT_ENCODER); tokenizer: None means the text encoder's; class_id: the class
    the text conditions (None: the file's start_class_id, else the original demo's 578). Returns a summary."""
    t0 = time.perf_counter()
    out = Path(out).expanduser()
    local = Path(str(source)).expanduser()
    _check_out(out, overwrite, [local] if local.exists() else [])
    sweep_temporaries(out.parent, prefix=f"{out.name}.", locked=False)  # what a killed import left beside --out
    path, prov = _locate(str(source), filename, revision)
    prov["sha256"] = _sha256(path)
    parts, hparams = split_state_dict(read_checkpoint(path), path.name)
    text_encoder = text_encoder or DEFAULT_TEXT_ENCODER
    # first the part that may need the network, so that an offline failure comes before the heavy work
    enc = build_hf_text_encoder(text_encoder, tokenizer or text_encoder, state_dict=parts.pop("text", None))
    lora_alpha = float(hparams.get("lora_alpha", DEFAULT_LORA_ALPHA))

    var_sd, merged = _var_state_dict(parts.pop("var"), lora_alpha)
    var_cfg = infer_var_config(var_sd)
    with torch.device("meta"):
        var = VAR(var_cfg)
    check_keys(var, var_sd, "the checkpoint's var.* weights")
    vae_sd = parts.pop("vqvae")
    vae_cfg = infer_vqvae_config(vae_sd, patch_nums=var_cfg.patch_nums)
    vae_cfg.resize = "bilinear"  # the original's quantizer (see the module docstring)
    with torch.device("meta"):
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
        pipeline = {"popyou_type": "pipeline", "version": 1, "var": "var", "vqvae": "vqvae", "vqvae_resize": "bilinear",
                    "vqvae_encoder": _encoder_source(vae_cfg), "encoder": encoder_entry,
                    "adapter": {"weights": "adapter.safetensors", "config": "adapter.json"},
                    "sampling": sampling, "provenance": prov}
        atomic_write_json(tmp / PIPELINE_JSON, pipeline)  # last: a folder with it is complete
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
        from .store import check_can_replace  # the one rule for what --overwrite may delete

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
        if (p / PIPELINE_JSON).is_file() or ((p / "config.json").is_file() and (p / "model.safetensors").is_file()):
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


def pick_checkpoint(listing: hub.RepoListing) -> str:
    found = [f for f in listing.files if f.lower().endswith(CHECKPOINT_SUFFIXES)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise PopyouError(f"the Hub repo '{listing.repo}' holds no checkpoint (.ckpt/.pth/.pt/.safetensors) and no "
                          f"{PIPELINE_JSON} (files: {', '.join(listing.files[:10]) or 'none'}); {_WHERE}")
    raise PopyouError(f"the Hub repo '{listing.repo}' holds several checkpoints ({', '.join(found)}); name one, e.g. "
                      f"{listing.ref.file(found[0])}, or pick it with --filename")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _safe_name(text: str) -> str:
    return re.sub(r"[^\w.\-]", "_", text)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


# ------------------------------------------------------------------------------------------ resolving a spec
def cache_root() -> Path:
    """popyou's own cache: $POPYOU_CACHE, else $XDG_CACHE_HOME/popyou, else ~/.cache/popyou."""
    if os.environ.get("POPYOU_CACHE"):
        return Path(os.environ["POPYOU_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "popyou"


def default_pipeline() -> str:
    """$POPYOU_PIPELINE, else the original demo's model."""
    return os.environ.get(PIPELINE_ENV) or DEFAULT_PIPELINE


def resolve_pipeline(spec: str | None = None, revision: str | None = None) -> Path:
    """A pipeline folder for `spec`: None -> default_pipeline(); a local folder as it is; a Hub spec (any repo
    type, optional file and revision) holding a popyou folder -> its snapshot; one holding the original model ->
    downloaded once through the Hugging Face cache, imported once into popyou's cache (keyed by repo and the
    commit the revision resolved to) and reused, offline too, without a request."""
    spec = spec or default_pipeline()
    local = Path(spec).expanduser()
    if local.is_dir():
        return local
    if local.is_file():
        raise PopyouError(f"{spec} is a file: make a pipeline folder from it with `popyou import {spec} --out DIR`")
    ref = hub.require_spec(spec, revision, "a pipeline folder or a Hub repo")
    repo_dir = cache_root() / "imports" / _safe_name(ref.repo.replace("/", "--"))
    pointer = repo_dir / "refs" / _safe_name(f"{ref.revision or 'main'}--{ref.filename or ''}")
    try:
        listing = hub.list_files(ref)
    except hub.HubOffline:
        return _resolve_offline(ref, repo_dir, pointer)
    if ref.filename is None and _is_popyou_folder(listing.files):
        # already popyou's format; by the name asked for (not the commit), so that the Hugging Face cache records
        # the ref and the same spec resolves offline later
        return hub.download_snapshot(ref)
    filename = ref.filename or pick_checkpoint(listing)
    if filename not in listing.files:
        raise PopyouError(f"the Hub repo '{ref.repo}' has no file {filename} at {ref.revision or 'its main branch'} "
                          f"(files: {', '.join(listing.files[:10]) or 'none'}); {_WHERE}")
    key = f"{listing.commit}--{_safe_name(filename)}"
    folder = repo_dir / key
    if not (folder / PIPELINE_JSON).is_file():
        import_checkpoint(ref.repo, folder, filename=filename, revision=listing.commit, overwrite=True)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(key)
    return folder


def _is_popyou_folder(files: list[str]) -> bool:
    return PIPELINE_JSON in files or {"config.json", "model.safetensors"} <= set(files)


def _resolve_offline(ref: hub.HubRef, repo_dir: Path, pointer: Path) -> Path:
    """What an earlier online run left: the imported folder the pointer names, else a cached popyou snapshot."""
    cached = repo_dir / pointer.read_text().strip() if pointer.is_file() else None
    if cached is not None and (cached / PIPELINE_JSON).is_file():
        return cached
    snap = hub.cached_snapshot(ref) if ref.filename is None else None
    if snap is not None and (snap / PIPELINE_JSON).is_file():
        return snap
    raise PopyouError(f"the pipeline '{ref}' is not in popyou's cache ({cache_root()}) and the Hub cannot be "
                      f"reached: run once online (`popyou download` fetches it), or `popyou import FILE --out DIR` "
                      f"a local copy and pass --pipeline DIR") from None
