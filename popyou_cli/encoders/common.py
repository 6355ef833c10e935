"""What the model loaders share: device and dtype choice, seeded tiny weights, the Hub-offline errors, and the
CLIP tokenizer built offline from open_clip's bundled BPE vocabulary (used by the tiny SDXL pipeline).

Heavy libraries are imported inside the functions (see the package docstring).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import PopyouError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

TINY = "tiny"

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
