"""The one place popyou talks to the Hugging Face Hub, and the one parser of the ways a user names something there.

A Hub spec is what a user types wherever a model is named (`--pipeline`, `popyou import`, `--var`/`--vae`,
`popyou download`, the Python API):

    OWNER/NAME                      a model repo                 AmitIsraeli/VAR_popfinetune
    OWNER/NAME/FILE                 one file of a model repo     FoundationVision/var/var_d16.pth
    spaces/OWNER/NAME[/FILE]        a Space (repo type "space")  spaces/AmitIsraeli/PopYou/VARtext_v1.pth
    datasets/OWNER/NAME[/FILE]      a dataset repo
    models/OWNER/NAME[/FILE]        a model repo, said explicitly
    ...@REVISION                    a branch, tag or commit      spaces/AmitIsraeli/PopYou@main
    https://huggingface.co/...      a page or file address copied from the browser (blob/ or resolve/ REV)

`parse_spec` turns one into a `HubRef`; every function below takes the repo type with it, for listing, downloads
and cache look-ups alike. Files go through the Hugging Face cache (with huggingface_hub's progress bar), so a
second run finds them there. A failure because the Hub cannot be reached (HF_HUB_OFFLINE, no network) raises
`HubOffline`, so a caller can fall back to what it already has; every other failure is one plain PopyouError line.
Tests reach these functions through a small Hub served over HTTP (HF_ENDPOINT), never by replacing them.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote

from popyou_cli.core.errors import PopyouError

REPO_TYPES = {"models": "model", "spaces": "space", "datasets": "dataset"}
_URL_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "hf://")
_NAME = re.compile(r"[A-Za-z0-9][\w.\-]*")
_WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")


class HubOffline(PopyouError):
    """The Hub cannot be reached (offline mode or no network) and the local cache does not hold what was asked."""


@dataclass(frozen=True)
class HubRef:
    """A repo on the Hub (with its type), and optionally one file in it and a revision."""
    repo_id: str
    repo_type: str = "model"
    filename: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"{prefix}{self.repo_id}{'/' + self.filename if self.filename else ''}" + (
            f"@{self.revision}" if self.revision else "")

    @property
    def repo(self) -> str:
        """The repo alone as a user writes it ('spaces/OWNER/NAME' for a Space): for messages and cache keys."""
        return str(replace(self, filename=None, revision=None))

    def at(self, revision: str | None) -> "HubRef":
        return replace(self, revision=revision)

    def file(self, filename: str | None) -> "HubRef":
        return replace(self, filename=filename)


def parse_spec(spec: str, revision: str | None = None) -> HubRef | None:
    """The HubRef a user's spec names, or None when it cannot name a Hub repo (too few parts, a path-like start,
    characters no repo name has). `revision` (a --revision option) wins over an `@REV` in the spec. Local paths
    are the caller's business: check them first."""
    text = spec.strip()
    for prefix in _URL_PREFIXES:
        if text.startswith(prefix):
            text = _from_url(text[len(prefix):])
            break
    if not text or text.startswith((".", "/", "~")) or "\\" in text:
        return None
    head, at, rev = text.rpartition("@")
    if at and "/" in head:
        text = head
    else:
        rev = None
    parts = [p for p in text.split("/") if p]
    repo_type = "model"
    if parts and parts[0] in REPO_TYPES:
        repo_type = REPO_TYPES[parts.pop(0)]
    if len(parts) < 2 or not all(_NAME.fullmatch(p) for p in parts[:2]) or ".." in parts:
        return None
    if repo_type == "model" and len(parts) == 2 and parts[1].lower().endswith(_WEIGHT_SUFFIXES):
        return None  # "models/var.pth" is a local file that is not there, not the repo "models/var.pth"
    return HubRef("/".join(parts[:2]), repo_type, "/".join(parts[2:]) or None, revision or rev or None)


def _from_url(rest: str) -> str:
    """'spaces/O/N/blob/REV/FILE' (or resolve/, tree/) -> 'spaces/O/N/FILE@REV'."""
    rest = unquote(rest.split("?")[0].split("#")[0]).strip("/")
    m = re.fullmatch(r"((?:spaces/|datasets/|models/)?[^/]+/[^/]+)/(?:blob|resolve|tree)/([^/]+)(?:/(.*))?", rest)
    if not m:
        return rest
    return f"{m[1]}{'/' + m[3] if m[3] else ''}@{m[2]}"


def require_spec(spec: str, revision: str | None = None, what: str = "a Hub repo") -> HubRef:
    """parse_spec, or one line that says what a spec looks like."""
    ref = parse_spec(spec, revision)
    if ref is None:
        raise PopyouError(f"no such file or folder, and not {what} (OWNER/NAME, spaces/OWNER/NAME, "
                          f"datasets/OWNER/NAME, each optionally /FILE and @REVISION): {spec}")
    return ref


@dataclass
class RepoListing:
    ref: HubRef  # the repo as asked (type, revision)
    commit: str  # the commit the revision resolves to: what a cache of derived files is keyed by
    files: list[str]
    sizes: dict[str, int | None]  # file -> bytes (None when the Hub did not say)

    @property
    def repo(self) -> str:
        return self.ref.repo


def _as_ref(repo: str | HubRef, repo_type: str | None, revision: str | None = None) -> HubRef:
    if isinstance(repo, HubRef):
        ref = repo if repo_type is None else replace(repo, repo_type=repo_type)
        return ref if revision is None else ref.at(revision)
    return HubRef(repo, repo_type or "model", None, revision)


def offline_mode() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) switched on for this process."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def list_files(repo: str | HubRef, revision: str | None = None, *, repo_type: str | None = None) -> RepoListing:
    """The files of a repo (any type) at `revision` (default branch when None), their sizes, and the commit."""
    from huggingface_hub import HfApi

    ref = _as_ref(repo, repo_type, revision)
    if offline_mode():
        raise HubOffline(f"cannot list the Hub repo '{ref.repo}': the Hub is switched off (HF_HUB_OFFLINE)")
    try:
        info = HfApi().repo_info(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - mapped to one line below
        raise _explain(e, ref, "list the files of") from None
    siblings = info.siblings or []
    return RepoListing(ref=ref, commit=info.sha or (ref.revision or "main"),
                       files=sorted(s.rfilename for s in siblings),
                       sizes={s.rfilename: getattr(s, "size", None) for s in siblings})


def file_sizes(repo: str | HubRef, revision: str | None = None, *, repo_type: str | None = None) -> dict:
    """{file: size in bytes (None when the Hub does not say)}: what `popyou download` shows before it fetches."""
    return list_files(repo, revision, repo_type=repo_type).sizes


def download_file(repo: str | HubRef, filename: str, revision: str | None = None, *,
                  repo_type: str | None = None) -> Path:
    """One file of a repo, through the Hugging Face cache (a progress bar while it downloads; an interrupted
    download resumes from what is there)."""
    from huggingface_hub import hf_hub_download

    ref = _as_ref(repo, repo_type, revision)
    try:
        return Path(hf_hub_download(ref.repo_id, filename, repo_type=ref.repo_type, revision=ref.revision))
    except Exception as e:  # noqa: BLE001
        raise _explain(e, ref, f"download '{filename}' from") from None


def cached_file(repo: str | HubRef, filename: str, revision: str | None = None, *,
                repo_type: str | None = None) -> Path | None:
    """The file already in the Hugging Face cache (no network), or None."""
    from huggingface_hub import try_to_load_from_cache

    ref = _as_ref(repo, repo_type, revision)
    found = try_to_load_from_cache(ref.repo_id, filename, revision=ref.revision, repo_type=ref.repo_type)
    return Path(found) if isinstance(found, str) else None


def download_snapshot(repo: str | HubRef, revision: str | None = None, *, repo_type: str | None = None) -> Path:
    """All files of a repo, through the Hugging Face cache; returns the snapshot folder."""
    from huggingface_hub import snapshot_download

    ref = _as_ref(repo, repo_type, revision)
    try:
        return Path(snapshot_download(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision))
    except Exception as e:  # noqa: BLE001
        raise _explain(e, ref, "download") from None


def cached_snapshot(repo: str | HubRef, revision: str | None = None, *, repo_type: str | None = None) -> Path | None:
    """The snapshot folder of a repo already in the Hugging Face cache (no network), or None."""
    from huggingface_hub import snapshot_download

    ref = _as_ref(repo, repo_type, revision)
    try:
        return Path(snapshot_download(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision,
                                      local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a valid id: nothing to reuse either way
        return None


def _explain(err: BaseException, ref: HubRef, action: str) -> PopyouError:
    """One line for a Hub failure: offline (HubOffline), missing or private repo, missing revision or file."""
    from huggingface_hub import errors as hub_errors

    at = f"@{ref.revision}" if ref.revision else ""
    where = f"cannot {action} the Hub repo '{ref.repo}{at}'"
    if isinstance(err, (hub_errors.OfflineModeIsEnabled, hub_errors.LocalEntryNotFoundError)) or offline_mode():
        return HubOffline(f"{where}: not in the local Hugging Face cache and the Hub cannot be reached (offline)")
    if isinstance(err, hub_errors.GatedRepoError):
        return PopyouError(f"{where}: the repo is gated; accept its terms on huggingface.co and log in with "
                           "`hf auth login`")
    if isinstance(err, hub_errors.RepositoryNotFoundError):
        hint = "" if ref.repo_type != "model" else " (a Space is spaces/OWNER/NAME, a dataset datasets/OWNER/NAME)"
        return PopyouError(f"{where}: no such {ref.repo_type} repo, or it is private (log in with `hf auth login`)"
                           f"{hint}")
    if isinstance(err, hub_errors.RevisionNotFoundError):
        return PopyouError(f"{where}: no such revision '{ref.revision}'")
    if isinstance(err, hub_errors.EntryNotFoundError):
        return PopyouError(f"{where}: no such file in the repo")
    if isinstance(err, hub_errors.HFValidationError):
        return PopyouError(f"{where}: '{ref.repo_id}' is not a valid Hub repo id")
    if _is_connection_error(err):
        return HubOffline(f"{where}: the Hub cannot be reached ({type(err).__name__})")
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return PopyouError(f"{where}: {type(err).__name__}: {line[:200]}")


def _is_connection_error(err: BaseException) -> bool:
    seen, cur = set(), err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        name = type(cur).__name__
        if isinstance(cur, (ConnectionError, TimeoutError)) or name in {"ConnectError", "ConnectTimeout",
                                                                         "ReadTimeout", "NetworkError"}:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def push_folder(folder: Path, repo: str, *, private: bool = False, message: str = "popyou upload") -> str:
    """Uploads exactly `folder` to the model repo `repo` (created when missing; `private` only applies then), with
    the standard Hugging Face login (popyou stores no token). Returns the commit URL."""
    import huggingface_hub

    try:
        huggingface_hub.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        info = huggingface_hub.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                                             commit_message=message)
    except Exception as e:  # noqa: BLE001 - one line, and the local result stays where it is
        from popyou_cli.core.errors import short_error

        raise PopyouError(f"--push-to-hub {repo} failed: {short_error(e, 200)} (log in with `hf auth login`); the "
                          f"result is saved locally in {folder}") from None
    return str(getattr(info, "commit_url", info))
