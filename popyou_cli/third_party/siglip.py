"""SigLIP through open_clip (the encode stage and the text/image adapters), its tiny stand-in, and the
embedding helpers :func:`encode_images`, :func:`encode_texts` and :func:`embedding_dim`."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from popyou_cli.core.errors import PopyouError
from popyou_cli.core.presets import DEFAULT_SIGLIP, DEFAULT_SIGLIP_PRETRAINED
from popyou_cli.third_party.common import _load_or_explain, _looks_like_path, fetch_hint, is_tiny, missing_from_cache, seeded

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

#: open_clip name under which the tiny SigLIP-like model is registered. It must not contain "siglip": open_clip
#: would then pick its SigLipTokenizer, which needs files from the Hub. Without it, the bundled CLIP BPE
#: tokenizer (SimpleTokenizer) is used, which works offline.
TINY_SIGLIP_NAME = "popyou-tiny-sigclip"

TINY_SIGLIP_SEED = 1003  # seed of the tiny stand-in's random weights (each family has its own)
TINY_SIGLIP_IMAGE_SIZE = 64
TINY_SIGLIP_EMBED_DIM = 32
TINY_SIGLIP_CONTEXT_LENGTH = 32


class _DropOpenClipLogs:
    """Root-logger filter dropping open_clip's messages while a loader runs.

    open_clip logs through the root logger: "No pretrained weights loaded ... initialized randomly" (expected for
    the tiny stand-in) and download failures (which reach the user as a PopyouError instead).
    """

    def filter(self, record) -> bool:  # noqa: A003 - logging API
        return "open_clip" not in record.pathname.replace("\\", "/").split("/")


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    import logging

    log_filter = _DropOpenClipLogs()
    logging.root.addFilter(log_filter)
    try:
        yield
    finally:
        logging.root.removeFilter(log_filter)


def tiny_siglip_config() -> dict:
    """open_clip model config of the tiny SigLIP-like model (CustomTextCLIP with a logit bias)."""
    return {
        "embed_dim": TINY_SIGLIP_EMBED_DIM,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {
            "image_size": TINY_SIGLIP_IMAGE_SIZE,
            "patch_size": 16,
            "width": 32,
            "layers": 2,
            "head_width": 16,
            "mlp_ratio": 2,
        },
        "text_cfg": {
            "context_length": TINY_SIGLIP_CONTEXT_LENGTH,
            "vocab_size": 49408,  # open_clip's SimpleTokenizer (CLIP BPE)
            "width": 32,
            "heads": 2,
            "layers": 2,
            "mlp_ratio": 2,
            "no_causal_mask": True,
            "proj_bias": True,
            "pool_type": "last",
        },
    }


@functools.lru_cache(maxsize=None)
def register_tiny_siglip() -> str:
    """Register the tiny SigLIP-like config with open_clip (once per process) and return its name.

    After this, ``open_clip.create_model_and_transforms(TINY_SIGLIP_NAME)`` and
    ``open_clip.get_tokenizer(TINY_SIGLIP_NAME)`` work like for a built-in model.
    """
    import atexit
    import json
    import shutil
    import tempfile

    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="popyou-open-clip-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / f"{TINY_SIGLIP_NAME}.json"
    path.write_text(json.dumps(tiny_siglip_config(), indent=2))
    open_clip.add_model_config(path)
    return TINY_SIGLIP_NAME


def load_siglip(
    model: str = DEFAULT_SIGLIP,
    pretrained: str | None = DEFAULT_SIGLIP_PRETRAINED,
    *,
    device: Any = "cpu",
):
    """``(model, preprocess, tokenizer)`` of an open_clip model, in eval mode, float32, on ``device``.

    ``model`` is ``"tiny"`` (or its registered name ``TINY_SIGLIP_NAME``), an open_clip name with
    ``pretrained`` a tag or a checkpoint file (default ``ViT-B-16-SigLIP`` / ``webli``), or a ``hf-hub:`` /
    ``local-dir:`` reference (``pretrained`` ignored). For a built-in name with ``pretrained=None``, its only
    pretrained tag is used; random weights are never returned silently. ``preprocess`` maps a PIL image to a
    (3, H, W) tensor; ``tokenizer(list_of_str)`` gives a LongTensor of token ids.
    """
    from popyou_cli.core.devices import resolve_device  # torch: imported on use (see the package docstring)

    dev = resolve_device(device)
    if is_tiny(model) or model == TINY_SIGLIP_NAME:
        return _tiny_siglip(dev)

    def load():
        import open_clip

        tag = pretrained
        if not model.startswith(("hf-hub:", "local-dir:")):
            if model not in open_clip.list_models():
                raise PopyouError(
                    f"unknown open_clip model {model!r}: use a name from open_clip.list_models(), "
                    f"'hf-hub:<repo>', 'local-dir:<folder>' or 'tiny'"
                )
            tags = open_clip.list_pretrained_tags_by_model(model)
            known = {t.lower() for t in tags}
            if tag is not None and tag.lower() not in known and not os.path.isfile(os.path.expanduser(tag)):
                raise PopyouError(
                    f"open_clip model {model!r}: pretrained {tag!r} is neither one of its tags "
                    f"({', '.join(tags) or 'none'}) nor a checkpoint file"
                )
            if tag is None:
                if len(tags) != 1:
                    raise PopyouError(
                        f"open_clip model {model!r} needs a pretrained tag or checkpoint file; tags: "
                        f"{', '.join(tags) or 'none'}"
                    )
                tag = tags[0]
            elif tag.lower() not in known:
                tag = os.path.expanduser(tag)
        # require_pretrained: fail rather than return random weights when the checkpoint cannot be loaded
        extra = {"require_pretrained": True} if _accepts_require_pretrained() else {}
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=tag, device=dev, **extra)
        return net, preprocess, open_clip_tokenizer(model)

    label = model
    if pretrained is not None and not model.startswith(("hf-hub:", "local-dir:")):
        label = f"{model} pretrained={pretrained}"
    repo = _open_clip_hub_repo(model, pretrained)
    fetch = f" ({fetch_hint('encode')})" if repo else ""
    if model.startswith("local-dir:"):
        path = model[len("local-dir:") :]
    elif not model.startswith("hf-hub:") and pretrained is not None and _looks_like_path(pretrained):
        path = pretrained  # a checkpoint file
    else:
        path = None
    with _quiet_open_clip():
        net, preprocess, tokenizer = _load_or_explain(
            "SigLIP (open_clip) model",
            label,
            load,
            path=path,
            hint=(
                f"download its weights and tokenizer first{fetch}, pass a checkpoint file as the pretrained tag, "
                "or use the tiny preset (--preset tiny)"
            ),
            missing=(lambda: missing_from_cache(repo, open_clip_weight_files(model, pretrained)[1])) if repo else None,
        )
    return net.eval(), preprocess, tokenizer


#: The files of a Hugging Face tokenizer (whichever of them its repo has); never its model weights.
HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "spiece.model",
    "sentencepiece.bpe.model", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
)
_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip tries them in order
_OPEN_CLIP_CONFIG = "open_clip_config.json"


def open_clip_text_config(model: str) -> dict:
    """The ``text_cfg`` of an open_clip model: built in, or the ``open_clip_config.json`` of an ``hf-hub:`` repo
    (read through the Hugging Face cache; `create_model` has fetched it already)."""
    import json

    import open_clip

    if model.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model[len("hf-hub:") :], _OPEN_CLIP_CONFIG)
        return json.loads(Path(path).read_text()).get("model_cfg", {}).get("text_cfg", {})
    return (open_clip.get_model_config(model) or {}).get("text_cfg", {})


def open_clip_tokenizer(model: str):
    """open_clip's tokenizer for ``model``, with its Hugging Face tokenizer (ViT-B-16-SigLIP's is
    ``timm/ViT-B-16-SigLIP``) read from a local folder: :func:`hf_tokenizer_folder`.

    open_clip would hand the repo id to ``AutoTokenizer``, which in transformers 5 first asks for the repo's
    ``config.json``; the SigLIP tokenizer repos have none, and offline a file that the cache has not recorded as
    missing is an error, even after the whole repo was downloaded. A folder has no such lookup.
    """
    import open_clip

    if model.startswith("local-dir:"):
        return open_clip.get_tokenizer(model)  # the tokenizer files sit in that folder
    text_cfg = open_clip_text_config(model)
    repo = text_cfg.get("hf_tokenizer_name")
    if not repo:
        return open_clip.get_tokenizer(model)  # open_clip's bundled tokenizers: nothing to fetch
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer

    return HFTokenizer(
        str(hf_tokenizer_folder(repo)),
        context_length=text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH),
        tokenizer_mode=text_cfg.get("tokenizer_mode"),
        **text_cfg.get("tokenizer_kwargs", {}),
    )


def hf_tokenizer_folder(repo: str) -> Path:
    """A local folder holding the Hugging Face tokenizer ``repo``: the folder itself, else its snapshot in the
    Hugging Face cache, else (online) its tokenizer files fetched into that cache. Offline and not cached: a
    PopyouError naming the missing file and `popyou download --stages encode`."""
    from popyou_cli.core import hub

    local = Path(repo).expanduser()
    if local.is_dir():
        return local
    snapshot = hub.cached_snapshot(repo)
    if snapshot is not None and _has_tokenizer(snapshot):
        return snapshot
    if not hub.offline_mode():
        try:
            names = tokenizer_files(hub.list_files(repo).files)
        except hub.HubOffline:
            names = []
        if names:
            paths = [hub.download_file(repo, name) for name in names]  # top-level files: one snapshot folder
            return Path(paths[0]).parent
    missing = missing_from_cache(repo, [("tokenizer_config.json", "tokenizer.json")])
    raise PopyouError(f"the tokenizer {repo!r} of the SigLIP model is not available: {missing}; "
                      f"{fetch_hint('encode')}")


def tokenizer_files(files: list[str]) -> list[str]:
    """The tokenizer files among a repo's files (top level only)."""
    return sorted(f for f in files if f in HF_TOKENIZER_FILES)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()


def open_clip_weight_files(model: str, pretrained: str | None) -> tuple[str | None, list]:
    """(Hub repo, files) holding an open_clip model's weights, as open_clip fetches them: the config of an
    ``hf-hub:`` model first, then the weights (a tuple: open_clip takes the first of them that exists). The repo
    is None for local models and for tags that are not on the Hub."""
    repo = _open_clip_hub_repo(model, pretrained)
    if repo is None:
        return None, []
    files: list = [_OPEN_CLIP_CONFIG] if model.startswith("hf-hub:") else []
    named = ""
    if not model.startswith("hf-hub:"):
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(model)
        tag = pretrained if pretrained is not None else (tags[0] if len(tags) == 1 else None)
        hf_hub = (open_clip.get_pretrained_cfg(model, tag) or {}).get("hf_hub", "") if tag in tags else ""
        named = "/".join(hf_hub.strip("/").split("/")[2:])  # "org/repo/" or "org/repo/file.bin"
    if named and named not in _OPEN_CLIP_WEIGHTS:
        files.append(named)
    else:
        files.append(_OPEN_CLIP_WEIGHTS)
    return repo, files


def _open_clip_hub_repo(model: str, pretrained: str | None) -> str | None:
    """The Hub repo that holds an open_clip model's weights, for error messages (None when unknown)."""
    if model.startswith("hf-hub:"):
        return model[len("hf-hub:") :]
    if model.startswith("local-dir:"):
        return None
    try:
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(model)
        tag = pretrained if pretrained is not None else (tags[0] if len(tags) == 1 else None)
        cfg = open_clip.get_pretrained_cfg(model, tag) if tag in tags else {}
    except Exception:  # noqa: BLE001 - only for a nicer message
        return None
    hub = (cfg or {}).get("hf_hub", "")
    return "/".join(hub.split("/")[:2]) if hub.count("/") >= 1 else None


@functools.lru_cache(maxsize=None)
def _accepts_require_pretrained() -> bool:
    import inspect

    import open_clip

    return "require_pretrained" in inspect.signature(open_clip.create_model).parameters


@functools.lru_cache(maxsize=8)
def _tiny_siglip(device: "torch.device"):
    net, preprocess, tokenizer = build_tiny_siglip()
    return net.to(device), preprocess, tokenizer


def build_tiny_siglip(*, seed: int = TINY_SIGLIP_SEED):
    """Build (uncached, on CPU) the tiny SigLIP-like open_clip model with seeded random weights.

    Returns ``(model, preprocess, tokenizer)`` like :func:`load_siglip`.
    """
    import open_clip

    name = register_tiny_siglip()
    with seeded(seed), _quiet_open_clip():
        net, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None, device="cpu", image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)
        )
    tokenizer = open_clip.get_tokenizer(name)
    return net.eval().requires_grad_(False), preprocess, tokenizer


def _model_device_dtype(model) -> tuple["torch.device", "torch.dtype"]:
    param = next(model.parameters())
    return param.device, param.dtype


def encode_images(model, pixel_batch: "torch.Tensor") -> "torch.Tensor":
    """L2-normalised float32 image embeddings ``(N, D)`` of a preprocessed pixel batch ``(N, 3, H, W)``.

    The batch is moved to the model's device and dtype; no gradients are recorded.
    """
    import torch

    device, dtype = _model_device_dtype(model)
    with torch.no_grad():
        features = model.encode_image(pixel_batch.to(device=device, dtype=dtype))
    return torch.nn.functional.normalize(features.float(), dim=-1)


def encode_texts(model, tokenizer, texts: Sequence[str]) -> "torch.Tensor":
    """L2-normalised float32 text embeddings ``(N, D)`` of ``texts`` (a string or a list); no gradients."""
    import torch

    if isinstance(texts, str):
        texts = [texts]
    device, _ = _model_device_dtype(model)
    tokens = tokenizer(list(texts)).to(device)
    with torch.no_grad():
        features = model.encode_text(tokens)
    return torch.nn.functional.normalize(features.float(), dim=-1)


def embedding_dim(model) -> int:
    """Width of the joint image/text embedding space of an open_clip model (768 for ViT-B-16-SigLIP)."""
    text_projection = getattr(model, "text_projection", None)
    if text_projection is not None:
        weight = getattr(text_projection, "weight", text_projection)
        return int(weight.shape[0] if hasattr(text_projection, "weight") else weight.shape[-1])
    text = getattr(model, "text", None)
    if text is not None and getattr(text, "output_dim", None):
        return int(text.output_dim)
    visual = getattr(model, "visual", None)
    if visual is not None and getattr(visual, "output_dim", None):
        return int(visual.output_dim)
    raise PopyouError(f"cannot tell the embedding width of {type(model).__name__}")
