"""Loading of the third-party models popyou builds on.

One loader per model family, each taking either a real model (a Hugging Face Hub id, a local folder, or an
open_clip name) or the word ``"tiny"``:

- :func:`load_text_to_image`: SDXL-Turbo through diffusers (the gen-data stage);
- :func:`load_captioner`: BLIP-2 through transformers (the caption stage);
- :func:`load_siglip`: SigLIP through open_clip (the encode stage and the text/image adapters), with
  :func:`encode_images`, :func:`encode_texts` and :func:`embedding_dim`.

``"tiny"`` builds a small randomly initialised stand-in of the same class from code: no download, no Hub, a
fraction of a second on CPU. Its weights come from a fixed seed drawn inside :func:`torch.random.fork_rng`, so
every process builds bit-identical stand-ins and the caller's random state is left untouched. Tiny builds are
cached in-process (the same call returns the same object), so treat them as shared: do not train them in place.

A real model that cannot be loaded because it is neither a local folder nor in the Hugging Face cache (and the
Hub is off or unreachable) raises :class:`~popyou_cli.errors.PopyouError` with a one-line explanation.

Heavy libraries (torch, diffusers, transformers, open_clip) are imported inside the functions so that importing
this module, and therefore ``popyou --help``, stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from popyou_cli.errors import PopyouError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

TINY = "tiny"

DEFAULT_TEXT_TO_IMAGE = "stabilityai/sdxl-turbo"
DEFAULT_CAPTIONER = "Salesforce/blip2-opt-2.7b"
DEFAULT_SIGLIP = "ViT-B-16-SigLIP"
DEFAULT_SIGLIP_PRETRAINED = "webli"

#: open_clip name under which the tiny SigLIP-like model is registered. It must not contain "siglip": open_clip
#: would then pick its SigLipTokenizer, which needs files from the Hub. Without it, the bundled CLIP BPE
#: tokenizer (SimpleTokenizer) is used, which works offline.
TINY_SIGLIP_NAME = "popyou-tiny-sigclip"

#: Seeds of the tiny stand-ins' random weights (one per family, so that they do not share weights by accident).
TINY_TEXT_TO_IMAGE_SEED = 1001
TINY_CAPTIONER_SEED = 1002
TINY_SIGLIP_SEED = 1003

TINY_IMAGE_SIZE = 64  # default output size of the tiny SDXL pipeline (latents are 8x smaller)
TINY_CAPTIONER_IMAGE_SIZE = 64
TINY_CAPTIONER_QUERY_TOKENS = 4
TINY_SIGLIP_IMAGE_SIZE = 64
TINY_SIGLIP_EMBED_DIM = 32
TINY_SIGLIP_CONTEXT_LENGTH = 32

CLIP_CONTEXT_LENGTH = 77  # SDXL's CLIP text encoders read 77 tokens
_CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_CLIP_BPE_MERGES = 49152 - 256 - 2  # number of merges in CLIP's vocabulary (49408 tokens in all)


# --------------------------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------------------------


def is_tiny(model: str | None) -> bool:
    """True when ``model`` names the built-in tiny stand-in."""
    return isinstance(model, str) and model.strip().lower() == TINY


def resolve_device(device: Any = None) -> "torch.device":
    """A :class:`torch.device` from a string, a device or None (None: CUDA when available, else CPU)."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32", "32": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16", "16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def resolve_dtype(dtype: Any, device: Any = None) -> "torch.dtype":
    """A :class:`torch.dtype` from a dtype, a name ("fp16", "bfloat16", ...) or None.

    None (or "auto") means float16 on CUDA and float32 elsewhere.
    """
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if resolve_device(device).type == "cuda" else torch.float32
    name = _DTYPE_NAMES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise PopyouError(f"unknown dtype {dtype!r}: use one of float32, float16, bfloat16")
    return getattr(torch, name)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's CPU random generator seeded with ``seed``; restore the previous state after.

    Used to initialise tiny stand-ins so that every process builds the same weights. Modules are built on the
    CPU (and moved afterwards), so only the CPU generator matters.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off for this process (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _is_unavailable_error(err: BaseException) -> bool:
    """True for the errors that mean "these files are not here and could not be fetched"."""
    try:
        from huggingface_hub import errors as hub_errors
    except ImportError:  # pragma: no cover
        hub_errors = None
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (OSError, ConnectionError, TimeoutError)):
            return True
        if hub_errors is not None and isinstance(
            cur,
            (
                hub_errors.HFValidationError,  # a path that does not exist, read as a malformed repo id
                hub_errors.EntryNotFoundError,
                hub_errors.OfflineModeIsEnabled,
            ),
        ):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _one_line(err: BaseException, limit: int = 240) -> str:
    """``"ErrorType: message"`` on one line, shortened to about ``limit`` characters."""
    detail = " ".join(str(err).split())
    if len(detail) > limit:
        detail = detail[: limit - 3] + "..."
    return f"{type(err).__name__}: {detail}" if detail else type(err).__name__


def _unavailable(what: str, model: str, err: BaseException, hint: str = "") -> PopyouError:
    """The one-line user-facing error for a model that is neither local nor in the Hugging Face cache."""
    detail = _one_line(err)
    if hub_offline():
        why = "is not available offline: it is not a local folder and not in the Hugging Face cache (HF_HUB_OFFLINE=1)"
    else:
        why = (
            "could not be loaded: it is not a local folder, not in the Hugging Face cache, and the Hub did not "
            "provide it"
        )
    fix = hint or f"download it first (`hf download {model}`) or use the tiny preset (--preset tiny)"
    return PopyouError(f"{what} {model!r} {why}; {fix} [{detail}]")


def _looks_like_path(model: str) -> bool:
    """True for names that can only be a local path (a Hub id is "name" or "org/name")."""
    return (
        model.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or os.path.isabs(model)
        or model in {".", ".."}
        or model.count("/") > 1
    )


_SAME_AS_MODEL = object()


def _load_or_explain(
    what: str, model: str, load: Callable[[], Any], hint: str = "", path: Any = _SAME_AS_MODEL
) -> Any:
    """Run ``load()``; turn "not local, not cached, not downloadable" errors into a one-line PopyouError.

    ``model`` names the model in messages; ``path`` is what may be a local file or folder (by default ``model``;
    None when nothing is).
    """
    import warnings

    path = model if path is _SAME_AS_MODEL else path
    local = path is not None and Path(path).expanduser().exists()
    if path is not None and _looks_like_path(path) and not local:
        raise PopyouError(f"{what} {model!r}: {path!r} does not exist (and it is not a Hugging Face Hub id)")
    try:
        with warnings.catch_warnings():
            # diffusers passes huggingface_hub an argument that it has deprecated: not the user's business
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return load()
    except PopyouError:
        raise
    except Exception as err:  # noqa: BLE001 - narrowed by _is_unavailable_error
        if local and isinstance(err, OSError):
            raise PopyouError(f"{what} {model!r} could not be loaded from {path!r}: {_one_line(err)}") from err
        if _is_unavailable_error(err):
            raise _unavailable(what, model, err, hint) from err
        raise


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


def _version_at_least(module: Any, version: str) -> bool:
    from packaging.version import Version

    try:
        return Version(module.__version__.split("+")[0]) >= Version(version)
    except Exception:  # noqa: BLE001 - unknown version strings: assume an old library
        return False


# --------------------------------------------------------------------------------------------------------------
# CLIP tokenizer built from open_clip's bundled BPE vocabulary (no download)
# --------------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte mapped to a printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def open_clip_bpe_path() -> Path:
    """Path of open_clip's bundled CLIP BPE vocabulary, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / _CLIP_BPE_FILE
        if path.is_file():
            return path
    raise PopyouError(f"open_clip's {_CLIP_BPE_FILE} was not found: is open_clip_torch installed?")


@functools.lru_cache(maxsize=None)
def clip_tokenizer(byte_level: bool = False):
    """A ``transformers.CLIPTokenizer`` equal to OpenAI CLIP's, built offline from open_clip's BPE file.

    With ``byte_level=True`` the vocabulary is only the 512 byte symbols plus the two special tokens (514 ids,
    no merges): text becomes one token per character. The full tokenizer has 49408 ids, and its ids match
    open_clip's SimpleTokenizer. Cached: the same object is returned on every call.
    """
    import gzip

    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    if not byte_level:
        lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _CLIP_BPE_MERGES + 1]]
        vocab_list += ["".join(pair) for pair in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_CONTEXT_LENGTH)


# --------------------------------------------------------------------------------------------------------------
# Text to image: SDXL(-Turbo) through diffusers
# --------------------------------------------------------------------------------------------------------------


def load_text_to_image(
    model: str = DEFAULT_TEXT_TO_IMAGE,
    *,
    device: Any = "cpu",
    dtype: Any = None,
    image_size: int = TINY_IMAGE_SIZE,
):
    """The text-to-image diffusers pipeline: ``"tiny"`` or a Hub id / local folder (default SDXL-Turbo).

    Call it as SDXL-Turbo is called: ``pipe(prompts, num_inference_steps=1, guidance_scale=0.0,
    generator=...)``. ``image_size`` only applies to ``"tiny"`` (the default height and width of its images; a
    multiple of 8). For real models the fp16 weight variant is used on CUDA in float16 when the repo has one.
    The progress bar is disabled (the stages show their own).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if is_tiny(model):
        return _tiny_text_to_image(int(image_size), dev, dt)

    def load():
        import torch
        from diffusers import AutoPipelineForText2Image

        try:
            from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401 - marks `dtype=` support
            dtype_kw = {"dtype": dt}
        except ImportError:
            dtype_kw = {"torch_dtype": dt}
        if dev.type == "cuda" and dt == torch.float16:
            try:
                return AutoPipelineForText2Image.from_pretrained(model, variant="fp16", **dtype_kw)
            except Exception:  # noqa: BLE001 - no fp16 variant (or not cached): try the plain weights
                pass
        return AutoPipelineForText2Image.from_pretrained(model, **dtype_kw)

    pipe = _load_or_explain("text-to-image model", model, load)
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=8)
def _tiny_text_to_image(image_size: int, device: "torch.device", dtype: "torch.dtype"):
    import torch

    pipe = build_tiny_text_to_image(image_size)
    # plain nn.Module.to: diffusers' own .to(dtype=...) warns about "modules to keep in float32" (there are none)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            torch.nn.Module.to(component, device=device, dtype=dtype)
    return pipe


def build_tiny_text_to_image(image_size: int = TINY_IMAGE_SIZE, *, seed: int = TINY_TEXT_TO_IMAGE_SEED):
    """Build (uncached, on CPU, float32) the tiny SDXL pipeline with seeded random weights.

    Same classes as SDXL-Turbo: UNet2DConditionModel with SDXL's text_time conditioning, an AutoencoderKL with
    vae_scale_factor 8, CLIPTextModel + CLIPTextModelWithProjection and the trailing Euler-ancestral scheduler.
    """
    if image_size % 8 or image_size < 8:
        raise PopyouError(f"tiny text-to-image size must be a positive multiple of 8, got {image_size}")
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer()
    text_width, time_embed_dim = 32, 8
    with seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=image_size // 8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 1),
            cross_attention_dim=2 * text_width,  # the two encoders' hidden states, concatenated
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            # 6 micro-conditioning numbers (original size, crop, target size) + the pooled text embedding
            projection_class_embeddings_input_dim=6 * time_embed_dim + text_width,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=image_size,
        )
        text_config = dict(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_CONTEXT_LENGTH,
            projection_dim=text_width,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    scheduler = EulerAncestralDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------------------------
# Captioner: BLIP-2 through transformers
# --------------------------------------------------------------------------------------------------------------


def load_captioner(
    model: str = DEFAULT_CAPTIONER,
    *,
    device: Any = "cpu",
    dtype: Any = None,
):
    """``(Blip2ForConditionalGeneration, processor)``: ``"tiny"`` or a Hub id / local folder (default BLIP-2 OPT-2.7b).

    Caption with ``inputs = processor(images=pil_images, return_tensors="pt")`` (plus ``text=`` prompts for
    prompted captions), ``ids = model.generate(**inputs.to(device, dtype), max_new_tokens=...)`` and
    ``processor.batch_decode(ids, skip_special_tokens=True)``. The tokenizer pads on the left, as batched
    generation with a decoder-only language model needs. The model is in eval mode.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if is_tiny(model):
        return _tiny_captioner(dev, dt)

    def load():
        import transformers
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        dtype_kw = {"dtype": dt} if _version_at_least(transformers, "4.56") else {"torch_dtype": dt}
        processor = Blip2Processor.from_pretrained(model)
        net = Blip2ForConditionalGeneration.from_pretrained(model, **dtype_kw)
        return net, processor

    net, processor = _load_or_explain("captioning model", model, load)
    processor.tokenizer.padding_side = "left"
    return net.to(dev).eval(), processor


@functools.lru_cache(maxsize=8)
def _tiny_captioner(device: "torch.device", dtype: "torch.dtype"):
    net, processor = build_tiny_captioner()
    return net.to(device=device, dtype=dtype), processor


# A fixed little corpus for the tiny captioner's BPE tokenizer: its merges only make tokens a few letters long.
_TINY_CAPTION_CORPUS = (
    "a funko pop figure of a man with a red hat and a blue shirt",
    "a vinyl toy of a woman with long black hair holding a sword",
    "a cartoon figurine of a robot standing on a white background",
    "a photo of a small toy with big eyes, green jacket and brown boots",
    "an illustration of a cute character wearing glasses and a yellow dress",
)
_TINY_CAPTION_SPECIALS = ("<pad>", "</s>", "<unk>")


@functools.lru_cache(maxsize=None)
def _tiny_caption_tokenizer_files() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Vocabulary and merges of a tiny byte-level BPE trained on a fixed corpus (deterministic, milliseconds)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        min_frequency=2,
        special_tokens=list(_TINY_CAPTION_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_TINY_CAPTION_CORPUS), trainer=trainer)
    state = json.loads(tok.to_str())["model"]
    vocab = tuple(sorted(state["vocab"].items(), key=lambda item: item[1]))
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"])
    return vocab, merges


def build_tiny_captioner(*, seed: int = TINY_CAPTIONER_SEED):
    """Build (uncached, on CPU, float32) the tiny BLIP-2 with seeded random weights, and its processor.

    Same classes as the real one: Blip2ForConditionalGeneration with an OPT language model, a GPT2Tokenizer
    (byte-level BPE, as OPT's) and a Blip2Processor with 64-pixel images and 4 query tokens. It captions with
    gibberish, quickly.
    """
    import string

    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        GPT2Tokenizer,
    )

    vocab, merges = _tiny_caption_tokenizer_files()
    tokenizer = GPT2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,  # as OPT's tokenizer: "</s>" starts every text
        padding_side="left",
    )
    image_processor = BlipImageProcessor(
        size={"height": TINY_CAPTIONER_IMAGE_SIZE, "width": TINY_CAPTIONER_IMAGE_SIZE},
    )
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=TINY_CAPTIONER_QUERY_TOKENS)
    image_token_id = tokenizer.convert_tokens_to_ids(str(processor.image_token))
    width = 32
    config = Blip2Config(
        vision_config=dict(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_CAPTIONER_IMAGE_SIZE,
            patch_size=16,
        ),
        qformer_config=dict(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            encoder_hidden_size=width,
            cross_attention_frequency=1,
        ),
        text_config=dict(
            model_type="opt",
            vocab_size=len(tokenizer),
            hidden_size=width,
            word_embed_proj_dim=width,
            ffn_dim=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        num_query_tokens=TINY_CAPTIONER_QUERY_TOKENS,
        image_token_index=image_token_id,
    )
    with seeded(seed):
        net = Blip2ForConditionalGeneration(config)
        # With the default init (std 0.02) every image gets the same caption; with std 0.2 the image shows.
        with torch.no_grad():
            for param in net.parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, 0.2)
    # Keep the gibberish word-like: only generate tokens made of letters, spaces and a little punctuation (stray
    # UTF-8 bytes would decode to U+FFFD), never <pad>, <unk> or <image>.
    allowed = set(string.ascii_letters + " ,.-'")
    suppress = sorted(
        i
        for token, i in tokenizer.get_vocab().items()
        if i != tokenizer.eos_token_id
        and (
            token in tokenizer.all_special_tokens
            or token == str(processor.image_token)
            or not set(tokenizer.convert_tokens_to_string([token])) <= allowed
        )
    )
    # BLIP-2's generate() hands over to its language model's generate(), which reads its own generation config
    for gen_config in {id(c): c for c in (net.generation_config, net.language_model.generation_config)}.values():
        gen_config.max_new_tokens = 20
        gen_config.min_new_tokens = 4  # random weights often pick "</s>" first: avoid empty captions
        gen_config.bos_token_id = tokenizer.bos_token_id
        gen_config.eos_token_id = tokenizer.eos_token_id
        gen_config.pad_token_id = tokenizer.pad_token_id
        gen_config.suppress_tokens = suppress
    return net.eval(), processor


# --------------------------------------------------------------------------------------------------------------
# SigLIP through open_clip
# --------------------------------------------------------------------------------------------------------------


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
        tokenizer = open_clip.get_tokenizer(model)
        return net, preprocess, tokenizer

    label = model
    if pretrained is not None and not model.startswith(("hf-hub:", "local-dir:")):
        label = f"{model} pretrained={pretrained}"
    repo = _open_clip_hub_repo(model, pretrained)
    fetch = f" (`hf download {repo}`)" if repo else ""
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
        )
    return net.eval(), preprocess, tokenizer


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
