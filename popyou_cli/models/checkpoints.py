"""Loading and saving VAR / VQ-VAE weights.

A weights spec is one of:
  * a local file: `.safetensors`, or an official / training `.pth` (read with `torch.load(weights_only=True)`);
  * a local popyou model folder: `config.json` + `model.safetensors`;
  * a Hub file `org/repo/file.pth`, or a Hub repo `org/repo` (the official repo gets its default file, any other
    repo is read as a popyou model folder), fetched through huggingface_hub's cache;
  * `tiny`: a small randomly initialised stand-in built in code from a fixed seed (64 px images, 4 scales),
    identical in every process, for tests and the offline quick-start.
The architecture is inferred from the state dict, so official and tiny checkpoints load without a config file.
Every load is strict: missing, unexpected or mis-shaped keys fail with one message that lists them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from popyou_cli.core.devices import on_meta
from popyou_cli.core.errors import PopyouError, short_error
from popyou_cli.core.formats import PIPELINE_JSON
from popyou_cli.core.presets import DEFAULT_VAE, DEFAULT_VAR, OFFICIAL_REPO, TINY
from popyou_cli.models.var import VAR, VARConfig
from popyou_cli.models.vqvae import OFFICIAL_PATCH_NUMS, VQVAE, VQVAEConfig

_OFFICIAL_DEFAULT_FILE = {"var": DEFAULT_VAR.rpartition("/")[2], "vqvae": DEFAULT_VAE.rpartition("/")[2]}
# patch_nums by (number of scales, total tokens) for checkpoints that carry no lvl_1L buffer
_KNOWN_PATCH_NUMS = {(10, 680): OFFICIAL_PATCH_NUMS, (10, 2240): (1, 2, 3, 4, 6, 9, 13, 18, 24, 32), (4, 30): (1, 2, 3, 4)}
# training checkpoints of the reference nest the weights; popyou's own training checkpoints use "model"
_NESTED = {"var": ("var_wo_ddp", "var"), "vqvae": ("vae_local", "vae")}
_PREFIXES = ("module.", "_orig_mod.")


# ------------------------------------------------------------------------------------------ files
def resolve(spec: str, kind: str, revision: str | None = None) -> tuple[Path, dict | None]:
    """Returns (weights file, popyou config or None). kind is 'var' or 'vqvae'. A Hub spec is any that
    hub.parse_spec reads (spaces/..., datasets/..., @REVISION): a file, the official repo's default file, or a repo
    holding a popyou model folder."""
    from popyou_cli.core import hub

    p = Path(spec).expanduser()
    if p.is_dir():
        return _model_folder(p)
    if p.is_file():
        return p, None
    ref = hub.parse_spec(spec, revision)
    if ref is None:
        raise PopyouError(f"no such file or folder: {spec}")
    if ref.filename is None and ref.repo == OFFICIAL_REPO:
        ref = ref.file(_OFFICIAL_DEFAULT_FILE[kind])
    if ref.filename is not None:
        return _hub_file(ref, ref.filename), None
    _hub_file(ref, "config.json")
    return _model_folder(_hub_file(ref, "model.safetensors").parent)


def _hub_file(ref, filename: str) -> Path:
    """One file through the Hugging Face cache; a failure is one line that says how to get the file."""
    from popyou_cli.core import hub

    try:
        return hub.download_file(ref, filename)
    except hub.HubOffline:
        why = "not in the local Hugging Face cache, and the Hub cannot be reached (offline)"
    except PopyouError as e:
        why = str(e).rpartition(": ")[2]
    raise PopyouError(f"cannot get '{filename}' from the Hub repo '{ref.repo}': {why}; fetch it once with network "
                      "access (`popyou download` fetches every stage's files; log in with `hf auth login` for "
                      "private repos) or pass a local path")


def _model_folder(folder: Path) -> tuple[Path, dict]:
    cfg, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg.is_file() or not weights.is_file():
        raise PopyouError(f"{folder} is not a popyou model folder (needs config.json and model.safetensors)"
                          f"{_right_folder_hint(folder)}")
    try:
        return weights, json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise PopyouError(f"{cfg} is not valid JSON: {e}") from None


def _right_folder_hint(folder: Path) -> str:
    """The folder meant when a run folder (or a pipeline folder) is given where a model folder belongs."""
    if (folder / "model" / "config.json").is_file():
        return f"; it is a finetune run folder: its model is {folder / 'model'}"
    if (folder / PIPELINE_JSON).is_file() and (folder / "var" / "config.json").is_file():
        return f"; it is a pipeline folder: its VAR is {folder / 'var'} (or use --pipeline / --init {folder})"
    if (folder / "pipeline" / PIPELINE_JSON).is_file():
        return (f"; it is a train-adapter run folder: its pipeline is {folder / 'pipeline'} (use --pipeline / --init "
                f"{folder / 'pipeline'})")
    return ""


def recorded_vqvae(folder: Path, meta: dict) -> str | None:
    """The VQ-VAE a VAR model folder's config.json records (a local path is relative to the folder)."""
    from popyou_cli.core.files import resolve_recorded

    return resolve_recorded(meta.get("vqvae"), folder)


def read_state_dict(path: Path, kind: str) -> dict[str, torch.Tensor]:
    """Reads a bare or nested state dict; never unpickles arbitrary objects."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, or a pickle weights_only refuses: one line
        import pickle

        from popyou_cli.core.failures import REFUSED_PICKLE

        why = REFUSED_PICKLE if isinstance(e, pickle.UnpicklingError) else short_error(e)
        raise PopyouError(f"{path} is not a readable checkpoint ({why})") from None
    sd = _unnest(sd, kind)
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PopyouError(f"{path} does not hold a {kind} state dict")
    for pre in _PREFIXES:
        if all(k.startswith(pre) for k in sd):
            sd = {k[len(pre):]: v for k, v in sd.items()}
    return sd


def _unnest(obj, kind: str):
    for _ in range(4):  # e.g. {'trainer': {'var_wo_ddp': {...}}}
        if not isinstance(obj, dict) or all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in ("trainer", *_NESTED[kind], "model", "state_dict", "module"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        else:
            return obj
    return obj


# ------------------------------------------------------------------------------------------ configs
def infer_var_config(sd: dict[str, torch.Tensor]) -> VARConfig:
    try:
        C, Cv = sd["word_embed.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        l2 = "blocks.0.attn.scale_mul_1H11" in sd
        heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1] if l2 else C // 64
        S, L = sd["lvl_embed.weight"].shape[0], sd["pos_1LC"].shape[1]
        pns = _patch_nums_from(sd.get("lvl_1L"), S, L)
        return VARConfig(depth=depth, embed_dim=C, num_heads=heads, num_classes=sd["class_emb.weight"].shape[0] - 1,
                         vocab_size=sd["head.weight"].shape[0], z_channels=Cv, patch_nums=pns,
                         mlp_ratio=sd["blocks.0.ffn.fc1.weight"].shape[0] / C,
                         shared_aln="shared_ada_lin.1.weight" in sd, attn_l2_norm=l2, drop_path_rate=0.1 * depth / 24)
    except (KeyError, ValueError) as e:
        raise PopyouError(f"this does not look like a VAR checkpoint (missing or odd key {e})") from None


def _patch_nums_from(lvl_1L, S: int, L: int) -> tuple[int, ...]:
    if lvl_1L is not None and lvl_1L.device.type != "meta":
        counts = torch.bincount(lvl_1L.flatten().long()).tolist()
        pns = tuple(round(c**0.5) for c in counts)
        if all(p * p == c for p, c in zip(pns, counts)):
            return pns
    if (S, L) in _KNOWN_PATCH_NUMS:
        return _KNOWN_PATCH_NUMS[(S, L)]
    raise PopyouError(f"cannot infer patch_nums for {S} scales / {L} tokens; save the model with a config.json")


def infer_vqvae_config(sd: dict[str, torch.Tensor], patch_nums=None) -> VQVAEConfig:
    """The architecture from the tensors: from the encoder when the file has one, else from the decoder (a file
    saved decoder side only, like the original demo's). Widths are relative to `ch`, the first level's width."""
    try:
        V, Cv = sd["quantize.embedding.weight"].shape
        if "encoder.conv_in.weight" in sd or "decoder.conv_out.weight" not in sd:
            ch = sd["encoder.conv_in.weight"].shape[0]
            levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
            ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
            n_res = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
        else:  # the decoder's finest level outputs ch channels and has one block more per level than the encoder
            ch = sd["decoder.conv_out.weight"].shape[1]
            levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up."))
            ch_mult = tuple(sd[f"decoder.up.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels))
            n_res = max(int(k.split(".")[4]) for k in sd if k.startswith("decoder.up.0.block."))
        has_encoder = any(k.startswith("encoder.") for k in sd)
    except (KeyError, ValueError) as e:
        raise PopyouError(f"this does not look like a VQ-VAE checkpoint (missing or odd key {e})") from None
    if "quantize.quant_resi.qresi.weight" in sd:
        share = 1
    elif any(k.startswith("quantize.quant_resi.qresi_ls.") for k in sd):
        share = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("quantize.quant_resi.qresi_ls."))
    else:
        share = 0
    if patch_nums is None:
        S = sd["quantize.ema_vocab_hit_SV"].shape[0] if "quantize.ema_vocab_hit_SV" in sd else 10
        patch_nums = OFFICIAL_PATCH_NUMS if S == 10 else next((p for (s, _), p in _KNOWN_PATCH_NUMS.items() if s == S), None)
        if patch_nums is None:
            raise PopyouError("cannot infer the VQ-VAE's patch_nums; pass them from the VAR model")
    return VQVAEConfig(vocab_size=V, z_channels=Cv, ch=ch, ch_mult=ch_mult, num_res_blocks=n_res,
                       share_quant_resi=share, patch_nums=tuple(patch_nums), has_encoder=has_encoder)


# ------------------------------------------------------------------------------------------ tiny stand-ins
TINY_PATCH_NUMS = (1, 2, 3, 4)


def build_tiny_vqvae(patch_nums=TINY_PATCH_NUMS) -> VQVAE:
    """Seeded random VQ-VAE: 64 codes of 8 channels, ch 32 (the smallest GroupNorm allows), 16x downsampling."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        vae = VQVAE(VQVAEConfig(vocab_size=64, z_channels=8, ch=32, patch_nums=tuple(patch_nums)))
        torch.nn.init.trunc_normal_(vae.quantize.embedding.weight, std=0.1)  # codes spread like a trained codebook
    return vae.requires_grad_(False).eval()


def build_tiny_var(num_classes: int = 10, patch_nums=TINY_PATCH_NUMS) -> VAR:
    """Seeded random VAR of depth 2, width 64, matching build_tiny_vqvae. Initialised like the golden `tiny`
    (strong AdaLN, head and embeddings): with VAR's default init the AdaLN gammas are ~1e-5, so a random model all
    but ignores its condition, and class, text and beta would not show in the pictures that tests compare."""
    cfg = VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=num_classes, vocab_size=64, z_channels=8,
                    patch_nums=tuple(patch_nums))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(35)
        var = VAR(cfg)
        var.init_weights(init_adaln=1.0, init_adaln_gamma=1.0, init_head=1.0, init_std=0.2)
    return var.eval()


# ------------------------------------------------------------------------------------------ loading
def check_keys(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, ignore_shape=()) -> None:
    want = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    bad = sorted(f"{k} {tuple(sd[k].shape)} != {tuple(want[k].shape)}" for k in set(want) & set(sd)
                 if k not in ignore_shape and tuple(sd[k].shape) != tuple(want[k].shape))
    if missing or unexpected or bad:
        show = lambda xs: ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")  # noqa: E731
        parts = [f"{name} {len(xs)}: {show(xs)}" for name, xs in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)) if xs]
        raise PopyouError(f"{source} does not fit the model: " + "; ".join(parts))


def _load_into(model: torch.nn.Module, sd: dict, source: str, ignore_shape=()) -> None:
    check_keys(model, sd, source, ignore_shape)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)


def load_var(spec: str, device: str | torch.device = "cpu") -> tuple[VAR, dict]:
    """Returns (VAR in eval mode, extra config such as class_names and the vqvae reference)."""
    if spec == TINY:
        return build_tiny_var().to(device), {"vqvae": TINY}
    path, meta = resolve(spec, "var")
    sd = read_state_dict(path, "var")
    cfg = VARConfig.from_dict(meta["config"]) if meta else infer_var_config(sd)
    with on_meta():
        model = VAR(cfg)
    _load_into(model, sd, str(path))
    model.init_buffers()
    return model.to(device).eval(), (meta or {})


def load_vqvae(spec: str, patch_nums=None, device: str | torch.device = "cpu", resize: str | None = None) -> VQVAE:
    """resize: the quantizer's resize mode (VQVAEConfig.resize); None keeps the folder's config.json value
    ("reference" for files without one)."""
    if spec == TINY:
        vae = build_tiny_vqvae(patch_nums or TINY_PATCH_NUMS)
        if resize is not None:
            vae.quantize.set_resize(resize)
            vae.config.resize = resize
        return vae.to(device)
    path, meta = resolve(spec, "vqvae")
    if meta and meta.get("popyou_type") == "var" and recorded_vqvae(path.parent, meta):
        # A VAR model folder given for the VQ-VAE: the one it records (what finetune trained it with).
        return load_vqvae(recorded_vqvae(path.parent, meta), patch_nums, device, resize)
    sd = read_state_dict(path, "vqvae")
    cfg = VQVAEConfig.from_dict(meta["config"]) if meta else infer_vqvae_config(sd, patch_nums)
    if patch_nums is not None:
        cfg.patch_nums = tuple(patch_nums)
    if resize is not None:
        cfg = VQVAEConfig.from_dict({**cfg.to_dict(), "resize": resize})
    with on_meta():
        model = VQVAE(cfg)
    # ema_vocab_hit_SV is a training statistic sized by the number of scales; the reference silently replaces
    # a mis-sized one, and so do we (one VQ-VAE file serves VARs with different patch_nums).
    sd = dict(sd)
    sd["quantize.ema_vocab_hit_SV"] = torch.zeros(len(cfg.patch_nums), cfg.vocab_size)
    _load_into(model, sd, str(path))
    model.requires_grad_(False)
    return model.to(device).eval()


def save_model(model: VAR | VQVAE, folder: str | Path, extra: dict | None = None) -> Path:
    """Writes model.safetensors + config.json, each committed atomically (files.atomic_write)."""
    from safetensors.torch import save_file

    from popyou_cli.core.files import atomic_write_json, committing

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = "var" if isinstance(model, VAR) else "vqvae"
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with committing(folder / "model.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt", "popyou_type": kind})
    atomic_write_json(folder / "config.json", {"popyou_type": kind, "config": model.config.to_dict(), **(extra or {})})
    return folder
