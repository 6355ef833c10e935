"""The local Hub of hub_server.py against the installed huggingface_hub, with no popyou code: what the real client
does with it (HEAD then GET, LFS redirects, Range resumes, errors, revisions, offline mode) is what it does with
huggingface.co, so tests of popyou's Hub-facing code can rely on it."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from hub_server import LocalHub, go_offline, hub_env, local_hub_fixture  # noqa: F401  (the `local_hub` fixture)
from huggingface_hub import constants
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import RepoFile, RepoFolder

SMALL = b"hello hub\n"
BIG = bytes(range(256)) * 12  # 3 KB: an LFS file under the fixture's 2 KB threshold
TYPE_PREFIX = {"model": "", "space": "/spaces", "dataset": "/datasets"}


def _download(filename, repo_type="model", repo_id="o/r", **kwargs) -> Path:
    return Path(huggingface_hub.hf_hub_download(repo_id, filename, repo_type=repo_type, **kwargs))


def _cdn_gets(hub):
    return [r for r in hub.requests if r.method == "GET" and r.path.startswith("/lfs-cdn/")]


@pytest.mark.parametrize("repo_type", ["model", "space", "dataset"])
def test_small_and_lfs_files_download_into_the_snapshot_of_the_served_commit(local_hub, repo_type):
    sha = local_hub.add_repo("o/r", {"f.txt": SMALL, "w.bin": BIG}, repo_type=repo_type)

    small, big = _download("f.txt", repo_type), _download("w.bin", repo_type)

    assert small.read_bytes() == SMALL and big.read_bytes() == BIG
    snapshot = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--o--r" / "snapshots" / sha
    assert small == snapshot / "f.txt" and big == snapshot / "w.bin"
    assert (snapshot.parent.parent / "refs" / "main").read_text() == sha
    prefix = TYPE_PREFIX[repo_type]
    assert ("HEAD", f"{prefix}/o/r/resolve/main/f.txt") in local_hub.requests
    assert ("GET", f"{prefix}/o/r/resolve/main/f.txt") in local_hub.requests
    # The LFS HEAD stops at the 302 (another origin) and the bytes come from the CDN, as on huggingface.co.
    assert ("HEAD", f"{prefix}/o/r/resolve/main/w.bin") in local_hub.requests
    assert [r.path.split("?")[0] for r in _cdn_gets(local_hub)] == [f"/lfs-cdn/{hashlib.sha256(BIG).hexdigest()}"]
    assert not [r for r in local_hub.requests if r.method == "HEAD" and r.path.startswith("/lfs-cdn/")]


def test_repo_info_with_files_metadata_gives_sizes_blob_ids_and_lfs(local_hub):
    infos = {"model": huggingface_hub.model_info, "space": huggingface_hub.space_info,
             "dataset": huggingface_hub.dataset_info}
    for repo_type, info_of in infos.items():
        sha = local_hub.add_repo("o/r", {"f.txt": SMALL, "w.bin": BIG}, repo_type=repo_type)

        plain = info_of("o/r")
        assert plain.id == "o/r" and plain.sha == sha and plain.private is False
        assert [(s.rfilename, s.size) for s in plain.siblings] == [("f.txt", None), ("w.bin", None)]

        detailed = {s.rfilename: s for s in info_of("o/r", files_metadata=True).siblings}
        assert detailed["f.txt"].size == len(SMALL) and detailed["f.txt"].lfs is None
        assert detailed["f.txt"].blob_id == hashlib.sha1(b"blob %d\0" % len(SMALL) + SMALL).hexdigest()
        assert detailed["w.bin"].size == len(BIG) and detailed["w.bin"].lfs.size == len(BIG)
        assert detailed["w.bin"].lfs.sha256 == hashlib.sha256(BIG).hexdigest()
        assert huggingface_hub.HfApi().repo_info("o/r", repo_type=repo_type, revision=sha).sha == sha
    assert ("GET", "/api/spaces/o/r?blobs=true") in local_hub.requests


def test_list_repo_files_and_tree_show_nested_folders(local_hub):
    local_hub.add_repo("o/r", {"a.txt": SMALL, "sub/b.txt": SMALL, "sub/deep/c.bin": BIG}, repo_type="space")
    api = huggingface_hub.HfApi()

    assert sorted(api.list_repo_files("o/r", repo_type="space")) == ["a.txt", "sub/b.txt", "sub/deep/c.bin"]
    top = {e.path: e for e in api.list_repo_tree("o/r", repo_type="space")}
    assert set(top) == {"a.txt", "sub"} and isinstance(top["sub"], RepoFolder) and isinstance(top["a.txt"], RepoFile)
    inside = {e.path: e for e in api.list_repo_tree("o/r", "sub", recursive=True, repo_type="space", expand=True)}
    assert set(inside) == {"sub/b.txt", "sub/deep", "sub/deep/c.bin"}
    lfs_file = inside["sub/deep/c.bin"]
    assert lfs_file.size == len(BIG) and lfs_file.lfs.sha256 == hashlib.sha256(BIG).hexdigest()
    assert inside["sub/b.txt"].last_commit is not None
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("o/r", "nowhere", repo_type="space"))


def test_snapshot_download_fetches_every_file_of_the_commit(local_hub):
    sha = local_hub.add_repo("o/r", {"a.txt": SMALL, "sub/c.bin": BIG}, repo_type="dataset")

    folder = Path(huggingface_hub.snapshot_download("o/r", repo_type="dataset"))

    assert folder.name == sha
    assert (folder / "a.txt").read_bytes() == SMALL and (folder / "sub" / "c.bin").read_bytes() == BIG


def test_missing_repo_revision_and_file_raise_the_hub_error_classes(local_hub):
    local_hub.add_repo("o/r", {"f.txt": SMALL})

    with pytest.raises(RepositoryNotFoundError) as anonymous:  # 401 to an anonymous caller, as the Hub answers
        _download("f.txt", repo_id="o/missing")
    assert anonymous.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as with_token:
        _download("f.txt", repo_id="o/missing", token="hf_not_a_real_token")
    assert with_token.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        huggingface_hub.model_info("o/missing")
    with pytest.raises(RepositoryNotFoundError):  # right name, wrong repo type
        _download("f.txt", repo_type="space")
    with pytest.raises(RevisionNotFoundError):
        _download("f.txt", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        huggingface_hub.model_info("o/r", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        _download("missing.txt")
    # The 404 names the commit, so the client remembers the file is missing there.
    no_exist = Path(constants.HF_HUB_CACHE) / "models--o--r" / ".no_exist"
    assert [p.relative_to(no_exist).parts[1:] for p in no_exist.glob("*/*")] == [("missing.txt",)]


@pytest.fixture
def no_retry_wait(monkeypatch):
    """huggingface_hub waits 1 s before retrying a broken download: skip the wait (what is sent is unchanged)."""
    monkeypatch.setattr(huggingface_hub.file_download.time, "sleep", lambda seconds: None)


def test_a_broken_small_download_is_retried_from_the_start_within_the_call(local_hub, no_retry_wait):
    local_hub.add_repo("o/r", {"w.bin": BIG})
    local_hub.interrupt("o/r", "w.bin", after_bytes=1000)

    path = _download("w.bin")

    # The client reads the body in DOWNLOAD_CHUNK_SIZE (10 MiB) pieces: bytes of an unfinished piece are lost, so a
    # file under 10 MiB is asked for again whole.
    assert path.read_bytes() == BIG
    assert [g.headers.get("Range") for g in _cdn_gets(local_hub)] == [None, None]


def test_a_broken_large_download_resumes_with_a_range_request(local_hub, no_retry_wait):
    chunk = constants.DOWNLOAD_CHUNK_SIZE
    big = os.urandom(chunk + 3000)
    local_hub.add_repo("o/r", {"big.safetensors": big})
    local_hub.interrupt("o/r", "big.safetensors", after_bytes=chunk + 1000)

    path = _download("big.safetensors")

    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(big).digest()
    gets = _cdn_gets(local_hub)
    assert [g.headers.get("Range") for g in gets] == [None, f"bytes={chunk}-"]


def test_a_download_that_keeps_breaking_fails_and_the_next_call_starts_over(local_hub, no_retry_wait):
    local_hub.add_repo("o/r", {"w.bin": BIG})
    local_hub.interrupt("o/r", "w.bin", after_bytes=0, times=6)  # the first try and its 5 retries: no byte

    with pytest.raises(httpx2.RemoteProtocolError, match="peer closed connection"):
        _download("w.bin")
    assert len(_cdn_gets(local_hub)) == 6
    blobs = Path(constants.HF_HUB_CACHE) / "models--o--r" / "blobs"
    assert not list(blobs.iterdir())  # no partial file is kept between calls

    assert _download("w.bin").read_bytes() == BIG
    assert _cdn_gets(local_hub)[-1].headers.get("Range") is None


def test_download_by_commit_sha_and_by_tag(local_hub):
    first = local_hub.add_repo("o/r", {"f.txt": b"one"})
    tagged = local_hub.add_repo("o/r", {"f.txt": b"tagged"}, revision="v1.0")
    latest = local_hub.add_repo("o/r", {"f.txt": b"two"})
    assert len({first, tagged, latest}) == 3

    assert _download("f.txt").read_bytes() == b"two"
    assert _download("f.txt", revision=first).read_bytes() == b"one"
    by_tag = _download("f.txt", revision="v1.0")
    assert by_tag.read_bytes() == b"tagged" and by_tag.parent.name == tagged
    refs = Path(constants.HF_HUB_CACHE) / "models--o--r" / "refs"
    assert (refs / "v1.0").read_text() == tagged and (refs / "main").read_text() == latest
    assert ("HEAD", f"/o/r/resolve/{first}/f.txt") in local_hub.requests


def test_offline_after_a_download_returns_the_cached_file_without_a_request(local_hub, monkeypatch):
    local_hub.add_repo("o/r", {"f.txt": SMALL, "w.bin": BIG})
    online = [_download("f.txt"), _download("w.bin")]
    seen = len(local_hub.requests)

    go_offline(monkeypatch)

    assert [_download("f.txt"), _download("w.bin")] == online
    assert len(local_hub.requests) == seen
    with pytest.raises(huggingface_hub.errors.LocalEntryNotFoundError):
        _download("never-downloaded.txt")


def test_a_subprocess_reaches_the_hub_through_the_hf_endpoint_variable(local_hub, tmp_path, monkeypatch):
    sha = local_hub.add_repo("o/r", {"f.txt": SMALL}, repo_type="space")
    code = "import huggingface_hub; print(huggingface_hub.hf_hub_download('o/r', 'f.txt', repo_type='space'))"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as conftest sets it: hub_env must switch it off for the child
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    env = hub_env(local_hub, tmp_path / "child_home")

    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=False)

    assert proc.returncode == 0, proc.stderr[-2000:]
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path == tmp_path / "child_home" / "hub" / "spaces--o--r" / "snapshots" / sha / "f.txt"
    assert path.read_bytes() == SMALL
    got = [r for r in local_hub.requests if r == ("GET", "/spaces/o/r/resolve/main/f.txt")]
    assert len(got) == 1 and "Authorization" not in got[0].headers


def test_stopped_hub_no_longer_answers():
    hub = LocalHub().start()
    url = hub.url
    hub.stop()
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(url.rsplit(":", 1)[1]))) != 0
