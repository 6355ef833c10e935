"""What the model loaders share: seeded tiny weights, the Hub-offline errors, and the
CLIP tokenizer built offline from open_clip's bundled BPE vocabulary (used by the tiny SDXL pipeline).

Heavy libraries are imported inside the functions (see the package docstring).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from popyou_cli.core.errors import PopyouError, short_error
from popyou_cli.core.presets import TINY

if TYPE_CHECKING:  # pragma: no cover - typing only
    pass

CLIP_CONTEXT_LENGTH = 77  # SDXL's CLIP text encoders read 77 tokens
_CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_CLIP_BPE_MERGES = 49152 - 256 - 2  # number of merges in CLIP's vocabulary (49408 tokens in all)


# --------------------------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------------------------


def is_tiny(model: str | None) -> bool:
    """True when ``model`` names the built-in tiny stand-in."""
    return isinstance(model, str) and model.strip().lower() == TINY


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


def fetch_hint(stage: str) -> str:
    """How to get a stage's files: the one command every loader error names."""
    return f"fetch it with `popyou download --stages {stage}`"


def missing_from_cache(repo: str, wanted: Sequence[str | tuple[str, ...]]) -> str:
    """What of the Hub repo `repo` the Hugging Face cache lacks, for an error message: "REPO/FILE is not in the
    Hugging Face cache" for the first missing entry of `wanted` (a tuple: any one of these files will do), or
    "nothing of REPO is in the Hugging Face cache". Looks at the cache only (no network)."""
    from popyou_cli.core import hub

    snapshot = hub.cached_snapshot(repo)
    if snapshot is None:
        return f"nothing of {repo} is in the Hugging Face cache"
    for entry in wanted:
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        if not any((snapshot / name).is_file() for name in names):
            return f"{repo}/{' or '.join(names)} is not in the Hugging Face cache"
    return f"{repo} is only partly in the Hugging Face cache"


def cached_json(repo: str, filename: str) -> dict | None:
    """A JSON file of a Hub repo read from the Hugging Face cache (no network), or None when it is not there."""
    import json

    from popyou_cli.core import hub

    snapshot = hub.cached_snapshot(repo)
    path = snapshot / filename if snapshot is not None else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


def _unavailable(what: str, model: str, err: BaseException, hint: str = "", stage: str | None = None,
                 missing: Callable[[], str] | None = None) -> PopyouError:
    """The one-line user-facing error for a model that is neither local nor in the Hugging Face cache: it names
    the file that is missing (`missing()`) and the command that fetches it (`popyou download --stages STAGE`)."""
    detail = short_error(err, 240, with_type=True)
    if hub_offline():
        why = "is not available offline: it is not a local folder and not in the Hugging Face cache (HF_HUB_OFFLINE=1)"
    else:
        why = (
            "could not be loaded: it is not a local folder, not in the Hugging Face cache, and the Hub did not "
            "provide it"
        )
    if missing is not None:
        why = f"{why}: {missing()}"
    fetch = fetch_hint(stage) if stage else f"download it first (`hf download {model}`)"
    fix = hint or f"{fetch} or use the tiny preset (--preset tiny)"
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
    what: str, model: str, load: Callable[[], Any], hint: str = "", path: Any = _SAME_AS_MODEL,
    stage: str | None = None, missing: Callable[[], str] | None = None,
) -> Any:
    """Run ``load()``; turn "not local, not cached, not downloadable" errors into a one-line PopyouError.

    ``model`` names the model in messages; ``path`` is what may be a local file or folder (by default ``model``;
    None when nothing is). ``stage`` names the `popyou download --stages` that fetches it, ``missing()`` says
    which file of it the cache lacks (asked only on failure).
    """
    import warnings

    path = model if path is _SAME_AS_MODEL else path
    local = path is not None and Path(path).expanduser().exists()
    if path is not None and _looks_like_path(path) and not local:
        raise PopyouError(f"{what} {model!r}: {path!r} does not exist (and it is not a Hugging Face Hub id)")
    filter_known_warnings()
    try:
        with warnings.catch_warnings(), quiet_loading():
            # diffusers passes huggingface_hub an argument that it has deprecated: not the user's business
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return load()
    except PopyouError:
        raise
    except Exception as err:  # noqa: BLE001 - narrowed by _is_unavailable_error
        if local and isinstance(err, OSError):
            raise PopyouError(f"{what} {model!r} could not be loaded from {path!r}: "
                              f"{short_error(err, 240, with_type=True)}") from err
        if _is_unavailable_error(err):
            raise _unavailable(what, model, err, hint, stage, missing) from err
        raise


@functools.lru_cache(maxsize=None)
def filter_known_warnings() -> None:
    """Install, once per process, filters for library warnings that say nothing to a popyou user.

    diffusers' SDXL pipeline calls its own deprecated ``upcast_vae()`` on every fp16 batch whose VAE asks for an
    fp32 decode (SDXL's does): a FutureWarning per batch about diffusers' internals, with nothing to change here.
    Importing diffusers' auto-pipelines runs modules that still decorate with ``torch.jit.script``: a
    FutureWarning from torch about a library's code, on the first load. The Euler-ancestral scheduler hands
    numpy a tensor: a DeprecationWarning from numpy 2 each time one is built.
    """
    import warnings

    warnings.filterwarnings("ignore", message=r".*`upcast_vae` is deprecated.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*`torch\.jit\.script` is deprecated.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"__array__ implementation doesn't accept a copy keyword",
                            category=DeprecationWarning)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """While a model loads: no progress bars of transformers ("Loading weights"), huggingface_hub ("Fetching N
    files") or diffusers ("Loading pipeline components"), restored afterwards. popyou's own progress is the one
    the user watches; `popyou download` shows the download bars, where they say something."""
    import sys

    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    hub_was_on = not hub_utils.are_progress_bars_disabled()
    hf_was_on = hf_logging.is_progress_bar_enabled()
    diffusers_logging = None
    if "diffusers" in sys.modules:  # only when a loader already imported it (an import costs a second)
        from diffusers.utils import logging as diffusers_logging
    diffusers_was_on = diffusers_logging is not None and diffusers_logging.is_progress_bar_enabled()
    hub_utils.disable_progress_bars()
    hf_logging.disable_progress_bar()
    if diffusers_logging is not None:
        diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hub_was_on:
            hub_utils.enable_progress_bars()
        if hf_was_on:
            hf_logging.enable_progress_bar()
        if diffusers_was_on:
            diffusers_logging.enable_progress_bar()


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
