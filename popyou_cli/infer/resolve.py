"""A pipeline spec -> a local pipeline folder: the one resolver of model specs for `sample`, `demo`, `eval`,
`download` and `Pipeline.from_pretrained`.

None means $POPYOU_PIPELINE, else the original demo's model (core/presets.DEFAULT_PIPELINE). A local folder is used as
it is; a Hub spec (core/hub.py: any repo type, optional file and revision) holding a popyou folder is downloaded
as a snapshot; one holding the original model is downloaded once through the Hugging Face cache and imported once
into popyou's cache (`imports/<repo>/<commit>--<file>`), then reused, offline too, without a single request.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from popyou_cli.core import hub
from popyou_cli.core.errors import PopyouError
from popyou_cli.core.files import cache_root
from popyou_cli.core.formats import PIPELINE_JSON
from popyou_cli.infer.folder import PipelineFolder
from popyou_cli.core.presets import DEFAULT_PIPELINE
from popyou_cli.infer.import_model import import_checkpoint
from popyou_cli.infer.original import WHERE_IT_LIVES, pick_checkpoint

PIPELINE_ENV = "POPYOU_PIPELINE"


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
                          f"(files: {', '.join(listing.files[:10]) or 'none'}); {WHERE_IT_LIVES}")
    key = f"{listing.commit}--{_safe_name(filename)}"
    folder = repo_dir / key
    if not PipelineFolder.is_pipeline(folder):
        import_checkpoint(ref.repo, folder, filename=filename, revision=listing.commit, overwrite=True)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(key)
    return folder


def _is_popyou_folder(files: list[str]) -> bool:
    return PIPELINE_JSON in files or {"config.json", "model.safetensors"} <= set(files)


def _resolve_offline(ref: hub.HubRef, repo_dir: Path, pointer: Path) -> Path:
    """What an earlier online run left: the imported folder the pointer names, else a cached popyou snapshot."""
    cached = repo_dir / pointer.read_text().strip() if pointer.is_file() else None
    if cached is not None and PipelineFolder.is_pipeline(cached):
        return cached
    snap = hub.cached_snapshot(ref) if ref.filename is None else None
    if snap is not None and PipelineFolder.is_pipeline(snap):
        return snap
    raise PopyouError(f"the pipeline '{ref}' is not in popyou's cache ({cache_root()}) and the Hub cannot be "
                      f"reached: run once online (`popyou download` fetches it), or `popyou import FILE --out DIR` "
                      f"a local copy and pass --pipeline DIR") from None


def _safe_name(text: str) -> str:
    return re.sub(r"[^\w.\-]", "_", text)


