"""A small Hugging Face Hub served over real HTTP on 127.0.0.1, so tests reach Hub-facing code through the real
`huggingface_hub` client (pointed at it with HF_ENDPOINT), never by replacing popyou's functions.

    hub = LocalHub()                                  # or the `local_hub` fixture: started, client pointed at it
    sha = hub.add_repo("o/r", {"f.txt": b"hi", "w.safetensors": Path(...)}, repo_type="space")
    with hub:                                         # start() ... stop()
        hub.url                                       # http://127.0.0.1:PORT, the value of HF_ENDPOINT
        hub.requests                                  # [("HEAD", "/spaces/o/r/resolve/main/f.txt"), ...]

It answers what the real Hub answers, in the shapes huggingface_hub 2.x reads:
- `GET /api/{models,spaces,datasets}/REPO[/revision/REV]` (`?blobs=true` adds sizes, blob ids and LFS details),
  `GET /api/{type}s/REPO/tree/REV[/PATH]` (`recursive`, `expand`), one page;
- `HEAD`/`GET /[spaces/|datasets/]REPO/resolve/REV/PATH` with `X-Repo-Commit`, `ETag` (git blob sha1) and
  `Range: bytes=N-` answered 206. An LFS file answers 302 to a "CDN" with `X-Linked-Etag` (its sha256) and
  `X-Linked-Size`. The CDN is a second server on another port: huggingface_hub follows a HEAD redirect when it stays
  on the same origin, so a CDN on the Hub's own origin would hide the LFS headers, which the real Hub never does;
- errors with `X-Error-Code` (RepoNotFound as 401 to anonymous callers and 404 to callers with a token, as the
  Hub does; RevisionNotFound and EntryNotFound as 404), which `hf_raise_for_status` maps to its error classes;
- `GET /api/agent-harnesses` (huggingface_hub asks for it once per process to build its user agent).

Every request to either server is recorded, in order, in `hub.requests`.

Pointing the real client at it: the `local_hub` fixture (in process: `use_hub`, which sets HF_ENDPOINT and a fresh
HF_HOME and patches the constants huggingface_hub read at import), `hub_env(hub, home)` for a subprocess, and
`go_offline(monkeypatch)` for "a second run sends no request" (a subprocess: `{**hub_env(...), "HF_HUB_OFFLINE": "1"}`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

REPO_TYPES = ("model", "space", "dataset")
DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024
# Git LFS is what a Hub repo's .gitattributes sends these to, whatever their size.
LFS_SUFFIXES = (".pth", ".ckpt", ".safetensors", ".bin")
CDN_PREFIX = "/lfs-cdn/"
_CHUNK = 1024 * 1024
_FIRST_COMMIT_DATE = datetime(2024, 1, 1, tzinfo=timezone.utc)
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class Request(tuple):
    """One request the hub received: a `(method, path)` pair (path as sent, query included) that also carries
    `.headers` (case-insensitive, e.g. `.headers.get("Range")`), so a test can compare it with a plain tuple."""

    headers: Message

    def __new__(cls, method: str, path: str, headers: Message) -> Request:
        request = super().__new__(cls, (method, path))
        request.headers = headers
        return request

    @property
    def method(self) -> str:
        return self[0]

    @property
    def path(self) -> str:
        return self[1]


@dataclass(frozen=True)
class _Blob:
    """A file's content (bytes, or a file read when served) and the hashes the Hub names it by."""
    size: int
    git_sha1: str
    sha256: str
    data: bytes | None = None
    path: Path | None = None

    @classmethod
    def of(cls, content: bytes | Path) -> _Blob:
        if isinstance(content, (bytes, bytearray)):
            data = bytes(content)
            return cls(len(data), _git_blob_sha1(data), hashlib.sha256(data).hexdigest(), data=data)
        path = Path(content)
        size = path.stat().st_size
        git, sha256 = hashlib.sha1(b"blob %d\0" % size), hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                git.update(chunk)
                sha256.update(chunk)
        return cls(size, git.hexdigest(), sha256.hexdigest(), path=path)

    def chunks(self, start: int, end: int):
        """The bytes [start, end), a chunk at a time (a file-backed blob is never read whole)."""
        if self.data is not None:
            for at in range(start, end, _CHUNK):
                yield self.data[at:min(at + _CHUNK, end)]
            return
        with open(self.path, "rb") as f:
            f.seek(start)
            while start < end:
                chunk = f.read(min(_CHUNK, end - start))
                if not chunk:
                    raise OSError(f"{self.path} shrank while being served")
                start += len(chunk)
                yield chunk


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class _File:
    """A file in a commit. An LFS file's git blob is its pointer; its bytes live on the CDN under their sha256."""
    blob: _Blob
    lfs: bool

    @property
    def pointer(self) -> bytes:
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.blob.sha256}\n"
                f"size {self.blob.size}\n").encode()

    @property
    def blob_id(self) -> str:
        return _git_blob_sha1(self.pointer) if self.lfs else self.blob.git_sha1


@dataclass(frozen=True)
class _Commit:
    sha: str
    files: dict[str, _File]
    date: str

    def folders(self) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)}


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    commits: dict[str, _Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag name -> commit sha

    def commit_at(self, revision: str) -> _Commit | None:
        """A branch, a tag, or a full commit sha, as the Hub accepts them."""
        sha = self.refs.get(revision, revision)
        return self.commits.get(sha)


class LocalHub:
    """A Hub on 127.0.0.1 (and its LFS "CDN" on a second port), in daemon threads. Not started until `start()`."""

    def __init__(self, *, lfs_threshold: int = DEFAULT_LFS_THRESHOLD):
        """`lfs_threshold`: files of at least this many bytes are LFS files (as are LFS_SUFFIXES); tests lower it
        so a 2 KB file takes the LFS path."""
        self.lfs_threshold = lfs_threshold
        self.requests: list[Request] = []
        self.url = ""
        self.cdn_url = ""
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._interrupts: dict[str, list[int]] = {}  # sha256 -> [after_bytes, times left]
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []

    # --- content -------------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes | Path], *, repo_type: str = "model",
                 revision: str = "main") -> str:
        """Makes a commit whose tree is exactly `files` (path in repo -> bytes, or a file served from disk, which
        must not change afterwards) and points `revision` (a branch or tag name) at it; returns its 40-hex sha.
        The first commit of a repo is also its `main`. Calling it again makes a new commit (a new sha)."""
        if repo_type not in REPO_TYPES:
            raise ValueError(f"repo_type must be one of {REPO_TYPES}, not {repo_type!r}")
        tree = {path: self._file(path, content) for path, content in sorted(files.items())}
        with self._lock:
            repo = self._repos.setdefault((repo_type, repo_id), _Repo(repo_type, repo_id))
            parent = repo.refs.get(revision) or repo.refs.get("main") or ""
            listing = "".join(f"{path}\0{f.blob_id}\n" for path, f in tree.items())
            sha = hashlib.sha1(f"{repo_type}s/{repo_id}\nparent {parent}\n{listing}".encode()).hexdigest()
            date = _FIRST_COMMIT_DATE + timedelta(minutes=len(repo.commits))
            repo.commits[sha] = _Commit(sha, tree, date.strftime("%Y-%m-%dT%H:%M:%S.000Z"))
            repo.refs[revision] = sha
            repo.refs.setdefault("main", sha)
        return sha

    def _file(self, path: str, content: bytes | Path) -> _File:
        blob = _Blob.of(content)
        return _File(blob, lfs=blob.size >= self.lfs_threshold or path.endswith(LFS_SUFFIXES))

    def interrupt(self, repo_id: str, path: str, *, after_bytes: int, times: int = 1,
                  repo_type: str = "model") -> None:
        """The next `times` GETs that send this file's bytes (the file as it is on main now; for an LFS file,
        the CDN GETs) send `after_bytes` bytes of the body, then drop the connection."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            blob = repo.commit_at("main").files[path].blob
            self._interrupts[blob.sha256] = [after_bytes, times]

    def _take_interrupt(self, blob: _Blob) -> int | None:
        with self._lock:
            pending = self._interrupts.get(blob.sha256)
            if not pending or pending[1] <= 0:
                return None
            pending[1] -= 1
            return pending[0]

    def _find(self, repo_type: str, segments: list[str]) -> tuple[_Repo, list[str]] | None:
        """The repo the path segments start with ("owner/name", or a legacy one-part name), and what follows."""
        with self._lock:
            for parts in (2, 1):
                repo = self._repos.get((repo_type, "/".join(segments[:parts])))
                if repo is not None and len(segments) >= parts:
                    return repo, segments[parts:]
        return None

    def _lfs_blob(self, sha256: str) -> _Blob | None:
        """The LFS blob with this sha256, in any commit of any repo (the CDN is keyed by content alone)."""
        with self._lock:
            for repo in self._repos.values():
                for commit in repo.commits.values():
                    for f in commit.files.values():
                        if f.lfs and f.blob.sha256 == sha256:
                            return f.blob
        return None

    def _record(self, method: str, path: str, headers: Message) -> None:
        with self._lock:
            self.requests.append(Request(method, path, headers))

    # --- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> LocalHub:
        """Listens on two free ports of 127.0.0.1 (the Hub, and the CDN its LFS files redirect to)."""
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            server.daemon_threads = True
            server.hub, server.role = self, role
            # A short poll keeps stop() quick: shutdown() waits for the loop to look at its flag.
            threading.Thread(target=server.serve_forever, args=(0.05,), name=f"local-hub-{role}",
                             daemon=True).start()
            self._servers.append(server)
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so a stopped hub leaves no idle keep-alive threads behind and a
    # dropped connection is only ever the one `interrupt` drops.
    protocol_version = "HTTP/1.0"

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def do_HEAD(self):
        self._serve("HEAD")

    def do_GET(self):
        self._serve("GET")

    def _serve(self, method: str) -> None:
        hub: LocalHub = self.server.hub
        hub._record(method, self.path, self.headers)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        # Split before unquoting: a revision like refs/pr/1 arrives as one %2F-quoted segment.
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        if self.server.role == "cdn":
            return self._cdn(method, segments)
        if segments[:2] == ["api", "agent-harnesses"]:
            return self._json({"standardEnvVars": [], "harnesses": {}})
        if segments[:1] == ["api"] and len(segments) > 2 and segments[1] in ("models", "spaces", "datasets"):
            return self._api(segments[1][:-1], segments[2:], query)
        repo_type = {"spaces": "space", "datasets": "dataset"}.get(segments[0], "model")
        return self._resolve(method, repo_type, segments[1:] if repo_type != "model" else segments)

    # --- /api/... ------------------------------------------------------------------------------------------

    def _api(self, repo_type: str, segments: list[str], query: dict[str, list[str]]) -> None:
        found = self.server.hub._find(repo_type, segments)
        if found is None:
            return self._repo_not_found()
        repo, rest = found
        if not rest:
            return self._info(repo, "main", query)
        if rest[0] == "revision" and len(rest) == 2:
            return self._info(repo, rest[1], query)
        if rest[0] == "tree" and len(rest) >= 2:
            return self._tree(repo, rest[1], "/".join(rest[2:]), query)
        self._error(404, None, "Not Found")

    def _info(self, repo: _Repo, revision: str, query: dict[str, list[str]]) -> None:
        commit = repo.commit_at(revision)
        if commit is None:
            return self._revision_not_found(revision)
        with_blobs = _flag(query, "blobs")
        info = {"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None, "sha": commit.sha,
                "lastModified": commit.date, "createdAt": _FIRST_COMMIT_DATE.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                "private": False, "gated": False, "disabled": False, "likes": 0, "tags": [],
                "siblings": [_sibling(path, f, with_blobs) for path, f in commit.files.items()],
                "usedStorage": sum(f.blob.size for f in commit.files.values())}
        if repo.repo_type == "model":
            info.update(modelId=repo.repo_id, downloads=0)
        elif repo.repo_type == "dataset":
            info.update(downloads=0)
        else:
            info.update(sdk="gradio", subdomain=repo.repo_id.replace("/", "-").lower())
        if "expand" in query:  # the Hub then answers only what was asked for
            wanted = set(query["expand"]) | {"_id", "id"}
            info = {k: v for k, v in info.items() if k in wanted}
        self._json(info)

    def _tree(self, repo: _Repo, revision: str, folder: str, query: dict[str, list[str]]) -> None:
        commit = repo.commit_at(revision)
        if commit is None:
            return self._revision_not_found(revision)
        folders = commit.folders()
        if folder and folder not in folders:
            return self._error(404, "EntryNotFound", f"{folder} does not exist on \"{revision}\"", commit.sha)
        prefix = f"{folder}/" if folder else ""
        recursive = _flag(query, "recursive")

        def listed(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix):])

        last_commit = {"id": commit.sha, "title": "Upload", "date": commit.date} if _flag(query, "expand") else None
        entries = [_folder_entry(path, commit, last_commit) for path in sorted(folders) if listed(path)]
        entries += [_file_entry(path, f, last_commit) for path, f in commit.files.items() if listed(path)]
        self._json(entries)

    # --- /REPO/resolve/REV/PATH and the CDN ----------------------------------------------------------------

    def _resolve(self, method: str, repo_type: str, segments: list[str]) -> None:
        found = self.server.hub._find(repo_type, segments)
        if found is None:
            return self._repo_not_found()
        repo, rest = found
        if len(rest) < 3 or rest[0] != "resolve":
            return self._error(404, None, "Not Found")
        revision, path = rest[1], "/".join(rest[2:])
        commit = repo.commit_at(revision)
        if commit is None:
            return self._revision_not_found(revision)
        file = commit.files.get(path)
        if file is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"", commit.sha)
        if file.lfs:
            return self._redirect_to_cdn(method, commit, path, file)
        self._send_blob(method, file.blob, {"X-Repo-Commit": commit.sha, "ETag": f'"{file.blob.git_sha1}"'})

    def _redirect_to_cdn(self, method: str, commit: _Commit, path: str, file: _File) -> None:
        name = quote(path.rsplit("/", 1)[-1])
        location = f"{self.server.hub.cdn_url}{CDN_PREFIX}{file.blob.sha256}?filename={name}"
        body = f"Found. Redirecting to {location}".encode()
        self.send_response(302)
        for key, value in {"Location": location, "X-Repo-Commit": commit.sha, "ETag": f'"{file.blob_id}"',
                           "X-Linked-Etag": f'"{file.blob.sha256}"', "X-Linked-Size": str(file.blob.size),
                           "Content-Type": "text/plain; charset=utf-8", "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if method == "GET":
            self.wfile.write(body)

    def _cdn(self, method: str, segments: list[str]) -> None:
        sha256 = segments[1] if len(segments) == 2 and segments[0] == CDN_PREFIX.strip("/") else ""
        blob = self.server.hub._lfs_blob(sha256)
        if blob is None:  # what S3 says to a key it does not hold
            return self._error(404, None, "NoSuchKey")
        self._send_blob(method, blob, {"ETag": f'"{hashlib.md5(sha256.encode()).hexdigest()}"'})

    def _send_blob(self, method: str, blob: _Blob, headers: dict[str, str]) -> None:
        """200 with the whole blob, or 206 with the part a `Range: bytes=START-[END]` asks for."""
        start, end, status = 0, blob.size, 200
        asked = _RANGE.fullmatch(self.headers.get("Range", "").replace(" ", ""))
        if asked and (asked[1] or asked[2]):
            if asked[1]:
                start, end = int(asked[1]), min(int(asked[2]) + 1 if asked[2] else blob.size, blob.size)
            else:  # bytes=-N: the last N bytes
                start = max(blob.size - int(asked[2]), 0)
            if start >= blob.size or start >= end:
                return self._error(416, None, "Range Not Satisfiable", extra={"Content-Range": f"bytes */{blob.size}"})
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{blob.size}"}
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(end - start), "Accept-Ranges": "bytes",
                           "Content-Type": "application/octet-stream"}.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "GET":
            return
        cut = self.server.hub._take_interrupt(blob)
        sent = 0
        for chunk in blob.chunks(start, end):
            if cut is not None and sent + len(chunk) >= cut:
                self.wfile.write(chunk[:cut - sent])
                self.wfile.flush()
                self.close_connection = True  # short of Content-Length: the client sees a broken download
                return
            self.wfile.write(chunk)
            sent += len(chunk)

    # --- answers -------------------------------------------------------------------------------------------

    def _json(self, payload) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _repo_not_found(self) -> None:
        # The Hub will not say to an anonymous caller whether a private repo exists: it answers 401 to them.
        status = 404 if self.headers.get("Authorization") else 401
        message = "Repository not found" if status == 404 else "Invalid username or password."
        self._error(status, "RepoNotFound", message)

    def _revision_not_found(self, revision: str) -> None:
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None,
               extra: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        headers = {"Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(body)),
                   "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        if commit:  # the client caches "this file does not exist at this commit" under it
            headers["X-Repo-Commit"] = commit
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, ["false"])[-1].lower() in ("1", "true")


def _sibling(path: str, file: _File, with_blobs: bool) -> dict:
    if not with_blobs:
        return {"rfilename": path}
    sibling = {"rfilename": path, "size": file.blob.size, "blobId": file.blob_id}
    if file.lfs:
        sibling["lfs"] = {"sha256": file.blob.sha256, "size": file.blob.size, "pointerSize": len(file.pointer)}
    return sibling


def _file_entry(path: str, file: _File, last_commit: dict | None) -> dict:
    entry = {"type": "file", "oid": file.blob_id, "size": file.blob.size, "path": path}
    if file.lfs:
        entry["lfs"] = {"oid": file.blob.sha256, "size": file.blob.size, "pointerSize": len(file.pointer)}
    if last_commit:
        entry["lastCommit"] = last_commit
    return entry


def _folder_entry(path: str, commit: _Commit, last_commit: dict | None) -> dict:
    inside = "".join(f"{p}\0{f.blob_id}\n" for p, f in commit.files.items() if p.startswith(path + "/"))
    entry = {"type": "directory", "oid": hashlib.sha1(inside.encode()).hexdigest(), "size": 0, "path": path}
    if last_commit:
        entry["lastCommit"] = last_commit
    return entry


# --- pointing the real client at a LocalHub ----------------------------------------------------------------

# Switches that would send the client elsewhere (staging, a token, offline mode) or leave it offline.
_CLEARED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HUGGINGFACE_CO_STAGING",
                "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE", "HF_HUB_CACHE",
                "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HF_XET_CACHE")


def _env_changes(hub: LocalHub, home: Path) -> dict[str, str]:
    """What a user sets to use this hub with a fresh HF_HOME (cache in HOME/hub, no token file there)."""
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1,localhost"]))
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_CACHE": str(Path(home) / "hub"),
            "NO_PROXY": no_proxy, "no_proxy": no_proxy}


def hub_env(hub: LocalHub, cache: Path) -> dict[str, str]:
    """The environment for a subprocess (e.g. the installed `popyou` command) that should use `hub`: this
    process's environment with HF_ENDPOINT=hub.url, HF_HOME=`cache` (the Hub cache in `cache`/hub), and no
    offline switch, token or staging flag."""
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED_ENV}
    return {**env, **_env_changes(hub, cache)}


def use_hub(hub: LocalHub, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Points this process's huggingface_hub at `hub`, with HF_HOME=`home`, as HF_ENDPOINT would at start-up.

    huggingface_hub reads its environment into module constants at import time, so besides the environment (for
    what is imported later) this patches the constants read at call time, and the endpoint that the module-level
    `HfApi()` behind `huggingface_hub.model_info` & co. copied when it was built."""
    import huggingface_hub.hf_api
    import huggingface_hub.utils._cache_manager
    from huggingface_hub import constants

    for name in _CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in _env_changes(hub, home).items():
        monkeypatch.setenv(name, value)
    home = Path(home)
    patches = {"ENDPOINT": hub.url, "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
               "HF_HUB_OFFLINE": False, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
               "HUGGINGFACE_HUB_CACHE": str(home / "hub"), "HF_ASSETS_CACHE": str(home / "assets"),
               "HF_XET_CACHE": str(home / "xet"), "HF_TOKEN_PATH": str(home / "token"),
               "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
               "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json")}
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.url)
    monkeypatch.setattr(huggingface_hub.utils._cache_manager, "HF_HUB_CACHE", str(home / "hub"))
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        # transformers keeps the HfApi it built first, endpoint included: let it build one for this hub
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
    _patch_datasets(monkeypatch, offline=False, endpoint=hub.url)


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 for this process from now on (env and the constant the client checks before each
    request): a call that still sends a request fails instead of reaching the hub."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _patch_datasets(monkeypatch, offline=True)


def _patch_datasets(monkeypatch: pytest.MonkeyPatch, *, offline: bool, endpoint: str | None = None) -> None:
    # `datasets` keeps its own copies; patch them only if it is loaded (if imported later, it reads the env).
    config = sys.modules.get("datasets.config")
    if config is None:
        return
    monkeypatch.setattr(config, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(config, "HF_DATASETS_OFFLINE", offline)
    if endpoint is not None:
        monkeypatch.setattr(config, "HF_ENDPOINT", endpoint)
        monkeypatch.setattr(config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")


@pytest.fixture(name="local_hub")
def local_hub_fixture(tmp_path, monkeypatch):
    """A started LocalHub (LFS threshold 2 KB) with this process's huggingface_hub pointed at it, and a fresh
    HF_HOME in tmp_path/"hf_home" (the Hub cache: tmp_path/"hf_home"/"hub"); stopped after the test."""
    with LocalHub(lfs_threshold=2048) as hub:
        use_hub(hub, tmp_path / "hf_home", monkeypatch)
        yield hub
