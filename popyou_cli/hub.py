"""The one place popyou talks to the Hugging Face Hub for whole repos: list a repo's files, download one file or a
snapshot through the Hugging Face cache (with huggingface_hub's progress bar), and turn every failure into one
line.

Callers use these functions through the module (`hub.list_files(...)`), so a test can replace them with a local
fake (monkeypatch `popyou_cli.hub.list_files`, `download_file`, `download_snapshot`, `cached_snapshot`) and no
test touches the network. A failure because the Hub cannot be reached (HF_HUB_OFFLINE, no network) raises
`HubOffline`, so a caller can fall back to what it already has; every other failure is a plain PopyouError.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import PopyouError


class HubOffline(PopyouError):
    """The Hub cannot be reached (offline mode or no network) and the local cache does not hold what was asked."""


@dataclass
class RepoListing:
    repo: str
    commit: str  # the commit the revision resolves to: what a cache of derived files is keyed by
    files: list[str]


def offline_mode() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) switched on for this process."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def list_files(repo: str, revision: str | None = None) -> RepoListing:
    """The files of a model repo at `revision` (default branch when None) and the commit it resolves to."""
    from huggingface_hub import HfApi

    if offline_mode():
        raise HubOffline(f"cannot list the Hub repo '{repo}': the Hub is switched off (HF_HUB_OFFLINE)")
    try:
        info = HfApi().model_info(repo, revision=revision)
    except Exception as e:  # noqa: BLE001 - mapped to one line below
        raise _explain(e, repo, revision, "list the files of") from None
    return RepoListing(repo=repo, commit=info.sha or (revision or "main"),
                       files=sorted(s.rfilename for s in (info.siblings or [])))


def download_file(repo: str, filename: str, revision: str | None = None) -> Path:
    """One file of a model repo, through the Hugging Face cache (a progress bar while it downloads)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except Exception as e:  # noqa: BLE001
        raise _explain(e, repo, revision, f"download '{filename}' from") from None


def download_snapshot(repo: str, revision: str | None = None) -> Path:
    """All files of a model repo, through the Hugging Face cache; returns the snapshot folder."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision))
    except Exception as e:  # noqa: BLE001
        raise _explain(e, repo, revision, "download") from None


def cached_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The snapshot folder of `repo` already in the Hugging Face cache (no network), or None."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a valid id: nothing to reuse either way
        return None


def _explain(err: BaseException, repo: str, revision: str | None, action: str) -> PopyouError:
    """One line for a Hub failure: offline (HubOffline), missing or private repo, missing revision or file."""
    from huggingface_hub import errors as hub_errors

    at = f"@{revision}" if revision else ""
    where = f"cannot {action} the Hub repo '{repo}{at}'"
    if isinstance(err, (hub_errors.OfflineModeIsEnabled, hub_errors.LocalEntryNotFoundError)) or offline_mode():
        return HubOffline(f"{where}: not in the local Hugging Face cache and the Hub cannot be reached (offline)")
    if isinstance(err, hub_errors.GatedRepoError):
        return PopyouError(f"{where}: the repo is gated; accept its terms on huggingface.co and log in with "
                           "`hf auth login`")
    if isinstance(err, hub_errors.RepositoryNotFoundError):
        return PopyouError(f"{where}: no such repo, or it is private (log in with `hf auth login`)")
    if isinstance(err, hub_errors.RevisionNotFoundError):
        return PopyouError(f"{where}: no such revision '{revision}'")
    if isinstance(err, hub_errors.EntryNotFoundError):
        return PopyouError(f"{where}: no such file in the repo")
    if isinstance(err, hub_errors.HFValidationError):
        return PopyouError(f"{where}: '{repo}' is neither a local path nor a valid Hub repo id")
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


def file_sizes(repo: str, revision: str | None = None) -> dict[str, int | None]:
    """{file: size in bytes (None when the Hub does not say)} of a model repo: what `popyou download` shows and
    chooses from before it fetches anything."""
    from huggingface_hub import HfApi

    if offline_mode():
        raise HubOffline(f"cannot list the Hub repo '{repo}': the Hub is switched off (HF_HUB_OFFLINE)")
    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - mapped to one line
        raise _explain(e, repo, revision, "list the files of") from None
    return {s.rfilename: getattr(s, "size", None) for s in (info.siblings or [])}


def push_folder(folder: Path, repo: str, *, private: bool = False, message: str = "popyou upload") -> str:
    """Uploads exactly `folder` to the model repo `repo` (created when missing; `private` only applies then), with
    the standard Hugging Face login (popyou stores no token). Returns the commit URL."""
    import huggingface_hub

    try:
        huggingface_hub.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        info = huggingface_hub.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                                             commit_message=message)
    except Exception as e:  # noqa: BLE001 - one line, and the local result stays where it is
        from .errors import short_error

        raise PopyouError(f"--push-to-hub {repo} failed: {short_error(e, 200)} (log in with `hf auth login`); the "
                          f"result is saved locally in {folder}") from None
    return str(getattr(info, "commit_url", info))
