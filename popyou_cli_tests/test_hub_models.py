"""Naming models on the Hub, through a small Hub served over HTTP on 127.0.0.1 (hub_server.py) that the real
huggingface_hub client reaches through HF_ENDPOINT, laid out like the real one: the demo Space
`spaces/AmitIsraeli/PopYou` holds VARtext_v1.pth (here the golden miniature in exactly that layout), the model repo
AmitIsraeli/VARpop only a README, google/siglip-base-patch16-224 the text encoder's config and tokenizer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from conftest import golden_dir
from helpers import invoke, one_line_error
from hub_server import go_offline, hub_env, local_hub_fixture  # noqa: F401 - the local_hub fixture
from popyou_cli.core import hub
from popyou_cli.core.presets import DEFAULT_PIPELINE
from popyou_cli.infer.resolve import resolve_pipeline

SPACE, SPACE_FILE, SIGLIP = "AmitIsraeli/PopYou", "VARtext_v1.pth", "google/siglip-base-patch16-224"
README_ONLY = b"---\nlicense: mit\ndatasets:\n- AmitIsraeli/pops_all\n---\n"  # what AmitIsraeli/VARpop shows


@pytest.fixture(scope="module")
def space_dir():
    d = golden_dir() / "space_checkpoint"
    if not (d / SPACE_FILE).is_file():
        pytest.skip(f"{SPACE_FILE} not found in {d} (set POPYOU_GOLDEN_DIR to the shared/golden folder)")
    return d


@pytest.fixture(scope="module")
def expected(space_dir):
    meta = json.loads((space_dir / "cases.json").read_text())
    return {c["name"]: c for c in meta["cases"]}, load_file(str(space_dir / "expected.safetensors"))


def _siglip_files(space_dir: Path) -> dict:
    """The real repo's layout: a full SiglipConfig (text_config + vision_config) and the tokenizer files."""
    text = json.loads((space_dir / "text_encoder" / "config.json").read_text())
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 16}
    config = {"architectures": ["SiglipModel"], "model_type": "siglip", "text_config": text, "vision_config": vision}
    files = {"config.json": json.dumps(config).encode(), "README.md": b"# SigLIP\n"}
    files.update({p.name: p for p in (space_dir / "tokenizer").iterdir()})
    return files


@pytest.fixture
def popyou_hub(local_hub, space_dir, tmp_path, monkeypatch):
    """The Hub as it is for the original model, a fresh popyou cache, and no $POPYOU_PIPELINE."""
    local_hub.space_commit = local_hub.add_repo(SPACE, {SPACE_FILE: space_dir / SPACE_FILE, "app.py": b"import gradio\n",
                                                        "README.md": b"# PopYou\n"}, repo_type="space")
    local_hub.add_repo("AmitIsraeli/VARpop", {"README.md": README_ONLY})
    local_hub.add_repo(SIGLIP, _siglip_files(space_dir))
    monkeypatch.setenv("POPYOU_CACHE", str(tmp_path / "popyou-cache"))
    monkeypatch.delenv("POPYOU_PIPELINE", raising=False)
    return local_hub


def _requests(local_hub) -> list:
    """What reached the Hub, without the client's one-off user-agent look-up."""
    return [r for r in local_hub.requests if "agent-harnesses" not in r.path]


def _assert_png_is(folder: Path, name: str, expected) -> None:
    (png,) = folder.glob("p0000_seed*.png")
    got = np.asarray(Image.open(png).convert("RGB")).astype(int)
    truncated = expected[1][f"{name}_seed_u8"][0].permute(1, 2, 0).numpy().astype(int)
    rounded = (expected[1][f"{name}_img"][0].permute(1, 2, 0) * 255).round().numpy().astype(int)
    assert min(np.abs(got - truncated).max(), np.abs(got - rounded).max()) <= 1


def _sample_args(expected, name: str, out: Path, *extra) -> list:
    case = expected[0][name]
    return ["sample", case["prompt"], "--n", 1, "--beta", case["beta"], "--seed", case["seed"], "--top-k",
            case["top_k"], "--top-p", case["top_p"], "--cfg", case["cfg"], "--device", "cpu", "--out", out, *extra]


# ------------------------------------------------------------------------------------------ the default model
def test_default_model_from_a_fresh_cache_then_offline_without_a_request(popyou_hub, expected, tmp_path, monkeypatch):
    res = invoke(*_sample_args(expected, "wizard_greedy", tmp_path / "a"))
    assert res.exit_code == 0, res.output
    _assert_png_is(tmp_path / "a", "wizard_greedy", expected)
    asked = [r.path for r in _requests(popyou_hub)]
    assert any(p.startswith(f"/api/spaces/{SPACE}") for p in asked), asked
    assert any(p.startswith(f"/spaces/{SPACE}/resolve/") and p.endswith(SPACE_FILE) for p in asked), asked
    assert not any("VARpop" in p for p in asked)
    # imported once into popyou's cache, keyed by the commit the Space's main branch resolved to
    folder = tmp_path / "popyou-cache" / "imports" / "spaces--AmitIsraeli--PopYou" / f"{popyou_hub.space_commit}--{SPACE_FILE}"
    pj = json.loads((folder / "pipeline.json").read_text())
    assert pj["provenance"]["source"] == f"spaces/{SPACE}" and pj["provenance"]["repo_type"] == "space"
    assert pj["provenance"]["revision"] == popyou_hub.space_commit and pj["sampling"]["class_id"] == 578

    go_offline(monkeypatch)
    popyou_hub.requests.clear()
    res = invoke(*_sample_args(expected, "astronaut_defaults", tmp_path / "b"))
    assert res.exit_code == 0, res.output
    _assert_png_is(tmp_path / "b", "astronaut_defaults", expected)
    assert _requests(popyou_hub) == []
    from popyou_cli import Pipeline

    assert Pipeline.from_pretrained(device="cpu").source == DEFAULT_PIPELINE
    assert _requests(popyou_hub) == []


def test_offline_with_nothing_cached_is_one_line(popyou_hub, tmp_path, monkeypatch):
    go_offline(monkeypatch)
    line = one_line_error(invoke("sample", "a wizard funko pop", "--out", tmp_path / "s"))
    assert "not in popyou's cache" in line and "popyou import FILE" in line
    assert _requests(popyou_hub) == []


def test_installed_command_reaches_the_hub_through_HF_ENDPOINT(popyou_hub, expected, tmp_path):
    """The command users type, in its own process, configured only by the environment."""
    env = {**hub_env(popyou_hub, tmp_path / "hf-child"), "POPYOU_CACHE": str(tmp_path / "child-cache"),
           "COLUMNS": "200"}
    env.pop("POPYOU_PIPELINE", None)
    popyou = Path(sys.executable).parent / "popyou"
    args = [str(a) for a in _sample_args(expected, "wizard_beta0", tmp_path / "c")]
    proc = subprocess.run([str(popyou), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_png_is(tmp_path / "c", "wizard_beta0", expected)
    assert any(r.path.startswith(f"/spaces/{SPACE}/resolve/") for r in popyou_hub.requests)


# ------------------------------------------------------------------------------------------ every way to name it
def test_spec_parser():
    P = hub.parse_spec
    assert P("AmitIsraeli/VARpop") == hub.HubRef("AmitIsraeli/VARpop")
    assert P("spaces/AmitIsraeli/PopYou/VARtext_v1.pth") == hub.HubRef(SPACE, "space", SPACE_FILE)
    assert P("spaces/AmitIsraeli/PopYou@v1") == hub.HubRef(SPACE, "space", None, "v1")
    assert P("datasets/o/d/sub/f.pth@refs/pr/1") == hub.HubRef("o/d", "dataset", "sub/f.pth", "refs/pr/1")
    assert P("models/o/m/f.safetensors") == hub.HubRef("o/m", "model", "f.safetensors")
    assert P("o/m", revision="abc") == hub.HubRef("o/m", revision="abc")
    assert P("o/m@main", revision="dev").revision == "dev"  # --revision wins over the spec's @REV
    url = "https://huggingface.co/spaces/AmitIsraeli/PopYou/blob/main/VARtext_v1.pth"
    assert P(url) == hub.HubRef(SPACE, "space", SPACE_FILE, "main")
    for not_hub in ("models/var.pth", "./o/m", "/abs/path", "~/x/y", "single", "o/../m", "spaces/onlyone", ""):
        assert P(not_hub) is None, not_hub
    assert str(hub.HubRef(SPACE, "space", SPACE_FILE, "v1")) == f"spaces/{SPACE}/{SPACE_FILE}@v1"


def test_every_repo_type_and_revision_imports_the_same_model(popyou_hub, space_dir, tmp_path):
    popyou_hub.add_repo("someone/popyou-copy", {SPACE_FILE: space_dir / SPACE_FILE, "README.md": b"x"})
    popyou_hub.add_repo("someone/weights", {"models/" + SPACE_FILE: space_dir / SPACE_FILE}, repo_type="dataset")
    tagged = popyou_hub.add_repo(SPACE, {SPACE_FILE: space_dir / SPACE_FILE}, repo_type="space", revision="v1")
    forms = {  # spec (+ --revision): the provenance it records
        "a": ([f"spaces/{SPACE}"], (f"spaces/{SPACE}", SPACE_FILE)),
        "b": ([f"spaces/{SPACE}/{SPACE_FILE}@v1"], (f"spaces/{SPACE}", SPACE_FILE)),
        "c": ([f"spaces/{SPACE}", "--revision", "v1"], (f"spaces/{SPACE}", SPACE_FILE)),
        "d": (["someone/popyou-copy"], ("someone/popyou-copy", SPACE_FILE)),
        "e": (["datasets/someone/weights/models/" + SPACE_FILE], ("datasets/someone/weights", "models/" + SPACE_FILE)),
    }
    weights = None
    for out, (args, (source, filename)) in forms.items():
        res = invoke("import", *args, "--out", tmp_path / out)
        assert res.exit_code == 0, (args, res.output)
        prov = json.loads((tmp_path / out / "pipeline.json").read_text())["provenance"]
        assert (prov["source"], prov["filename"]) == (source, filename), args
        got = load_file(str(tmp_path / out / "var" / "model.safetensors"))
        assert weights is None or all(got[k].equal(weights[k]) for k in weights), args
        weights = got
    assert json.loads((tmp_path / "b" / "pipeline.json").read_text())["provenance"]["revision"] == "v1"
    assert tagged != popyou_hub.space_commit
    # the same spec forms reach sample's --pipeline (imported once, then reused)
    res = invoke("sample", "a wizard funko pop", "--pipeline", f"spaces/{SPACE}", "--revision", "v1", "--n", 1,
                 "--device", "cpu", "--out", tmp_path / "s")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "popyou-cache" / "imports" / "spaces--AmitIsraeli--PopYou" / f"{tagged}--{SPACE_FILE}").is_dir()


@pytest.mark.parametrize("spec, words", [
    ("AmitIsraeli/VARpop", ["holds no checkpoint", "files: README.md", f"spaces/{SPACE}/{SPACE_FILE}",
                            "popyou import FILE"]),
    ("nobody/nothing", ["no such model repo", "spaces/OWNER/NAME"]),
    (SPACE, ["no such model repo", "a Space is spaces/OWNER/NAME"]),  # a Space named without spaces/
    (f"spaces/{SPACE}/missing.pth", ["has no file missing.pth"]),
    (f"spaces/{SPACE}@no-such-branch", ["no such revision 'no-such-branch'"]),
    ("spaces/nobody/nothing", ["no such space repo"]),
])
def test_what_is_missing_is_one_line(popyou_hub, tmp_path, spec, words):
    line = one_line_error(invoke("sample", "a wizard funko pop", "--pipeline", spec, "--out", tmp_path / "s"))
    for word in words:
        assert word in line, line
    line = one_line_error(invoke("import", spec, "--out", tmp_path / "p"))
    assert not (tmp_path / "p").exists()


def test_var_and_vae_from_any_repo_type(popyou_hub, golden, tmp_path):
    popyou_hub.add_repo("o/tiny-var", {"var.safetensors": golden / "tiny_var.safetensors",
                                       "vae.safetensors": golden / "tiny_vae.safetensors"}, repo_type="dataset")
    res = invoke("sample", "--class-id", 1, "--var", "datasets/o/tiny-var/var.safetensors", "--vae",
                 "datasets/o/tiny-var/vae.safetensors", "--n", 1, "--device", "cpu", "--out", tmp_path / "s")
    assert res.exit_code == 0, res.output
    assert any(r.path.startswith("/datasets/o/tiny-var/resolve/") for r in popyou_hub.requests)
    line = one_line_error(invoke("sample", "--class-id", 1, "--var", "datasets/o/tiny-var/none.safetensors",
                                 "--vae", "tiny", "--n", 1, "--out", tmp_path / "t"))
    assert "none.safetensors" in line and "datasets/o/tiny-var" in line


def test_a_popyou_pipeline_repo_is_a_snapshot_and_resolves_offline(popyou_hub, space_dir, tmp_path, monkeypatch):
    made = tmp_path / "made"
    assert invoke("import", space_dir / SPACE_FILE, "--out", made, "--text-encoder", space_dir / "text_encoder",
                  "--tokenizer", space_dir / "tokenizer").exit_code == 0
    popyou_hub.add_repo("someone/pipe", {str(p.relative_to(made)): p for p in made.rglob("*") if p.is_file()})
    folder = resolve_pipeline("someone/pipe")
    assert (folder / "pipeline.json").read_bytes() == (made / "pipeline.json").read_bytes()
    go_offline(monkeypatch)
    assert resolve_pipeline("someone/pipe") == folder


# ------------------------------------------------------------------------------------------ downloads
def test_interrupted_download_resumes(popyou_hub, space_dir, tmp_path):
    """The connection drops after 11 MiB of the 14 MB file: the client asks for the rest with a Range request."""
    assert (space_dir / SPACE_FILE).stat().st_size > 12 * 2**20
    popyou_hub.interrupt(SPACE, SPACE_FILE, after_bytes=11 * 2**20, repo_type="space")
    res = invoke("import", f"spaces/{SPACE}/{SPACE_FILE}", "--out", tmp_path / "p")
    assert res.exit_code == 0, res.output
    ranges = [r.headers.get("Range") for r in popyou_hub.requests if r.headers.get("Range")]
    assert ranges and all(r.startswith("bytes=") and not r.startswith("bytes=0-") for r in ranges), ranges
    prov = json.loads((tmp_path / "p" / "pipeline.json").read_text())["provenance"]
    import hashlib

    assert prov["sha256"] == hashlib.sha256((space_dir / SPACE_FILE).read_bytes()).hexdigest()


def test_download_lists_then_fetches_the_default_model(popyou_hub, space_dir, tmp_path, monkeypatch):
    res = invoke("download", "--stages", "sample", "--dry-run")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    size = f"{(space_dir / SPACE_FILE).stat().st_size / 1e6:.1f} MB"
    assert f"spaces/{SPACE}: 1 file, {size}" in text, text
    assert f"{SIGLIP}: 1 file" in text and "tokenizer" not in text.split(SIGLIP)[0]  # config, then tokenizer
    assert text.count(SIGLIP) >= 2 and "to fetch: 4 files" in text, text  # the .pth, config.json, 2 tokenizer files
    assert not (tmp_path / "popyou-cache").exists()  # a dry run imports nothing

    res = invoke("download", "--stages", "sample")
    assert res.exit_code == 0, res.output
    assert "ok sample: pipeline spaces/AmitIsraeli/PopYou/VARtext_v1.pth" in " ".join(res.output.split())
    go_offline(monkeypatch)
    popyou_hub.requests.clear()
    res = invoke("sample", "a wizard funko pop", "--n", 1, "--device", "cpu", "--out", tmp_path / "s")
    assert res.exit_code == 0, res.output
    assert _requests(popyou_hub) == []
    assert os.listdir(tmp_path / "popyou-cache" / "imports") == ["spaces--AmitIsraeli--PopYou"]
