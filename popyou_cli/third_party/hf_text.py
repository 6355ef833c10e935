"""A transformers SigLIP / SigLIP2 text tower as a popyou text encoder: exactly what the original PopYOU model ran.

    enc = load_hf_text_encoder("pipeline/text_encoder", tokenizer="pipeline/tokenizer", device="cpu")
    enc(["a wizard funko pop"])   # (P, enc.dim) float32, L2-normalised rows

Per prompt, as the original: the tokenizer pads to its maximum length (`padding="max_length"`), everything it
returns goes into the text model, and the embedding is `pooler_output` (the last position through the head),
L2-normalised. A prompt longer than the maximum is truncated with a warning (the original crashed on it).

`build_hf_text_encoder` makes one from an architecture (a Hub id or a folder with config.json) and a state dict
(the 4.x key layout with `text_model.` or the 5.x one without), which is how `popyou import` uses it;
`save_pretrained` then writes `text_encoder/` and `tokenizer/` so a pipeline folder runs offline.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from popyou_cli.core.errors import PopyouError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_HF_TEXT_ENCODER = "google/siglip-base-patch16-224"
TEXT_ENCODER_DIR, TOKENIZER_DIR = "text_encoder", "tokenizer"
_TEXT_MODEL_TYPES = ("siglip_text_model", "siglip2_text_model")


class HFTextEncoder:
    """A transformers text model and its tokenizer. `enc(prompts)` -> (P, dim) float32 unit-norm embeddings."""

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        cfg = model.config
        # the tokenizer's own maximum, bounded by the position table (tokenizers without one report ~1e30)
        self.max_length = min(int(tokenizer.model_max_length), int(cfg.max_position_embeddings))
        self._accepts = set(inspect.signature(model.forward).parameters)

    @property
    def dim(self) -> int:
        """Width of the pooled embedding: the head's output (projection_size, or hidden_size in older configs)."""
        head = getattr(self.model, "head", None) or getattr(getattr(self.model, "text_model", None), "head", None)
        return int(head.out_features) if head is not None else int(self.model.config.hidden_size)

    @property
    def device(self) -> "torch.device":
        return next(self.model.parameters()).device

    def to(self, device) -> "HFTextEncoder":
        self.model.to(device)
        return self

    def tokenize(self, prompts: list[str]) -> dict:
        """The tokenizer's output as the original made it (padded to the maximum), long prompts truncated."""
        if isinstance(prompts, str):
            prompts = [prompts]
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), verbose=False)["input_ids"]]
        too_long = [p for p, n in zip(prompts, lengths) if n > self.max_length]
        if too_long:
            warnings.warn(f"{len(too_long)} prompt(s) longer than the text encoder's {self.max_length} tokens were "
                          f"truncated, e.g. {too_long[0][:60]!r}", stacklevel=3)
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt")

    def pooled(self, prompts: list[str]) -> "torch.Tensor":
        """pooler_output (P, dim) in float32, before normalisation (what the original fed to F.normalize)."""
        import torch

        outs = []
        for start in range(0, len(prompts), self.batch_size):
            ids = self.tokenize(prompts[start:start + self.batch_size])
            # everything the tokenizer returns, as the original passed it (minus what this model cannot take)
            inputs = {k: v.to(self.device) for k, v in ids.items() if k in self._accepts}
            with torch.no_grad():
                outs.append(self.model(**inputs).pooler_output.float())
        return torch.cat(outs) if outs else torch.zeros(0, self.dim, device=self.device)

    def __call__(self, prompts: list[str]) -> "torch.Tensor":
        import torch.nn.functional as F

        if isinstance(prompts, str):
            prompts = [prompts]
        return F.normalize(self.pooled(list(prompts)), dim=-1)

    def save_pretrained(self, folder: str | Path, model_dir: str = TEXT_ENCODER_DIR,
                        tokenizer_dir: str = TOKENIZER_DIR) -> dict:
        """Writes folder/text_encoder and folder/tokenizer; returns the pipeline.json `encoder` entry."""
        folder = Path(folder)
        with _quiet_transformers():
            self.model.save_pretrained(str(folder / model_dir))
            self.tokenizer.save_pretrained(str(folder / tokenizer_dir))
        return {"library": "transformers", "path": model_dir, "tokenizer": tokenizer_dir, "embedding": "text"}


# ---------------------------------------------------------------------------------------------- loading
def text_config(spec: str):
    """The text tower's config from a Hub id or a folder with config.json (a full SigLIP config gives its
    text_config)."""
    from transformers import AutoConfig

    with _explained(spec, "text encoder config"):
        cfg = AutoConfig.from_pretrained(spec)
    cfg = getattr(cfg, "text_config", None) or cfg
    if cfg.model_type not in _TEXT_MODEL_TYPES:
        raise PopyouError(f"{spec}: the text encoder must be a SigLIP or SigLIP2 text model (config model_type "
                          f"{cfg.model_type!r})")
    return cfg


def _model_class(cfg):
    import transformers

    return transformers.Siglip2TextModel if cfg.model_type == "siglip2_text_model" else transformers.SiglipTextModel


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    with _explained(spec, "tokenizer"):
        return AutoTokenizer.from_pretrained(spec)


def build_hf_text_encoder(config_spec: str, tokenizer: str | None = None,
                          state_dict: dict | None = None) -> HFTextEncoder:
    """The text model of `config_spec`'s architecture with `state_dict`'s weights (4.x `text_model.` keys or 5.x
    keys; strict), or with the encoder's own weights when state_dict is None."""
    cfg = text_config(config_spec)
    cls = _model_class(cfg)
    if state_dict is None:
        with _explained(config_spec, "text encoder weights"), _quiet_transformers():
            model = cls.from_pretrained(config_spec, config=cfg)
    else:
        from popyou_cli.core.devices import on_meta

        with on_meta():
            model = cls(cfg)
        sd = _fit_layout(state_dict, model)
        want = model.state_dict()
        missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
        bad = sorted(f"{k} {tuple(sd[k].shape)} != {tuple(want[k].shape)}" for k in set(want) & set(sd)
                     if tuple(sd[k].shape) != tuple(want[k].shape))
        if missing or unexpected or bad:
            show = lambda xs: ", ".join(xs[:6]) + (f" (+{len(xs) - 6} more)" if len(xs) > 6 else "")  # noqa: E731
            parts = [f"{n} {len(x)}: {show(x)}" for n, x in (("missing", missing), ("unexpected", unexpected),
                                                             ("mis-shaped", bad)) if x]
            raise PopyouError(f"the text encoder weights do not fit the architecture of {config_spec}: "
                              + "; ".join(parts))
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False, assign=True)
        _init_nonpersistent_buffers(model)
    return HFTextEncoder(model.float(), load_tokenizer(tokenizer or config_spec))


def load_hf_text_encoder(folder_or_id: str | Path, tokenizer: str | Path | None = None,
                         device="cpu") -> HFTextEncoder:
    """A saved text encoder (a folder written by save_pretrained, or a Hub id) and its tokenizer. A local folder
    of a SigLIP text tower loads without transformers' model classes (siglip_text.py: the same numbers, seconds
    sooner); anything else through transformers."""
    from popyou_cli.third_party.siglip_text import load_text_tower, load_tokenizer_file

    tower = load_text_tower(folder_or_id)
    if tower is None:
        return build_hf_text_encoder(str(folder_or_id), str(tokenizer) if tokenizer else None).to(device)
    tok_spec = tokenizer or folder_or_id
    tok = load_tokenizer_file(tok_spec) or load_tokenizer(str(tok_spec))
    return HFTextEncoder(tower, tok).to(device)


def _fit_layout(sd: dict, model) -> dict:
    """Adds or drops the `text_model.` prefix so the keys follow the installed transformers' layout."""
    want_prefixed = any(k.startswith("text_model.") for k in model.state_dict())
    have_prefixed = bool(sd) and all(k.startswith("text_model.") for k in sd)
    if want_prefixed and not have_prefixed:
        return {f"text_model.{k}": v for k, v in sd.items()}
    if have_prefixed and not want_prefixed:
        return {k[len("text_model."):]: v for k, v in sd.items()}
    return dict(sd)


def _init_nonpersistent_buffers(model) -> None:
    """Buffers not stored in files (position_ids) are still on the meta device after assign-loading."""
    import torch

    for mod in model.modules():
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf.device.type == "meta":
                if name == "position_ids":
                    mod.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
                else:
                    raise PopyouError(f"the text encoder has a buffer '{name}' that the checkpoint does not hold")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Loading a text tower from a full SigLIP checkpoint reports the unused vision weights (expected here), and
    transformers draws a progress bar for every load and save of even a small local model (noise here)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _explained(spec: str, what: str) -> Iterator[None]:
    """Missing folder, offline without a cached copy, bad files: one line."""
    try:
        yield
    except PopyouError:
        raise
    except Exception as e:  # noqa: BLE001
        from popyou_cli.core.hub import offline_mode

        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        local = Path(spec).expanduser().exists() or spec.startswith((".", "/", "~"))
        if not local and (offline_mode() or isinstance(e, OSError)):
            raise PopyouError(f"cannot load the {what} '{spec}': not a local folder and not in the Hugging Face "
                              f"cache with the Hub reachable; run once online or pass a local folder "
                              f"({line[:120]})") from None
        raise PopyouError(f"cannot load the {what} from '{spec}': {line[:200]}") from None
