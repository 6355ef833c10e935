"""`popyou download` against a small Hub served over HTTP (hub_server.py; the real huggingface_hub client through
HF_ENDPOINT): tiny repos built in a temp folder, fetched into a fresh Hugging Face cache. After the download every
chosen stage loads in a fresh process with HF_HUB_OFFLINE=1, although the repos lack optional files (the
tokenizer repo has no config.json, the BLIP-2 processor no num_query_tokens); decoys (a top-level single-file
checkpoint, .bin twins, fp16 files on a float32 run) are not fetched. Also: loader errors name the missing file
and the command."""
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from popyou_cli.core import hub
from popyou_cli.core import presets as P
from popyou_cli.core.errors import PopyouError

from helpers import invoke
from hub_server import go_offline, local_hub_fixture  # noqa: F401 - the local_hub fixture

REPOS = ("fake/sdxl", "fake/blip2", "fake/siglip-tok", "fake/siglip", "fake/var")


class TinyHub:
    """The served repos, and what of them is in the Hugging Face cache (what a download fetched)."""

    def __init__(self, served, cache: Path):
        self.served, self.cache = served, cache

    @property
    def fetched(self) -> set[str]:
        """'repo/file' for every file the cache holds, as huggingface_hub lays it out (snapshots/<commit>/...)."""
        got = set()
        for repo in REPOS:
            for snap in (self.cache / f"models--{repo.replace('/', '--')}" / "snapshots").glob("*"):
                got |= {f"{repo}/{f.relative_to(snap)}" for f in snap.rglob("*") if f.is_file()}
        return got


# ------------------------------------------------------------------------------------------ tiny repos
def _sdxl_repo(folder: Path) -> None:
    from popyou_cli.third_party import build_tiny_text_to_image

    pipe = build_tiny_text_to_image(64)
    pipe.save_pretrained(folder)
    pipe.save_pretrained(folder, variant="fp16")  # fp16 twins: a float32 run must not fetch them
    (folder / "sd_single_file.safetensors").write_bytes(b"decoy")  # a top-level single-file checkpoint


def _blip2_repo(folder: Path) -> None:
    from popyou_cli.third_party import build_tiny_captioner

    net, processor = build_tiny_captioner()
    net.save_pretrained(folder)
    processor.save_pretrained(folder)
    cfg = json.loads((folder / "processor_config.json").read_text())
    cfg.pop("num_query_tokens")  # as in processor files older than the image-token format: must be fixed on load
    (folder / "processor_config.json").write_text(json.dumps(cfg))
    (folder / "pytorch_model.bin").write_bytes(b"decoy")  # safetensors exist: the .bin twin is not fetched
    (folder / "README.md").write_text("docs")


def _spm_tokenizer_repo(folder: Path) -> None:
    """A T5-style sentencepiece tokenizer (as SigLIP's) with no config.json: needs sentencepiece + protobuf."""
    import sentencepiece as spm

    folder.mkdir(parents=True)
    buf = io.BytesIO()
    corpus = ["a funko pop figure of a man with a red hat", "a vinyl toy of a woman with long black hair",
              "a cartoon robot standing on a white background"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
                                   hard_vocab_limit=False)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "model_max_length": 16, "pad_token": "<pad>", "eos_token": "</s>",
        "unk_token": "<unk>", "extra_ids": 0}))


def _siglip_repo(folder: Path, tokenizer_repo: str) -> None:
    from open_clip.model import CustomTextCLIP
    from safetensors.torch import save_file

    from popyou_cli.third_party.siglip import tiny_siglip_config

    model_cfg = tiny_siglip_config()
    model_cfg["text_cfg"].update(vocab_size=64, context_length=16, hf_tokenizer_name=tokenizer_repo,
                                 tokenizer_kwargs={"clean": "canonicalize"})
    folder.mkdir(parents=True)
    cfg_file = folder / "open_clip_config.json"
    cfg_file.write_text(json.dumps({"model_cfg": model_cfg,
                                    "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    torch.manual_seed(0)
    net = CustomTextCLIP(**{k: v for k, v in model_cfg.items() if k != "custom_text"})
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "open_clip_model.safetensors"))


def _var_repo(folder: Path) -> None:
    from popyou_cli.models.checkpoints import build_tiny_var, build_tiny_vqvae

    folder.mkdir(parents=True)
    torch.save(build_tiny_vqvae().state_dict(), folder / "vae_tiny.pth")
    torch.save(build_tiny_var().state_dict(), folder / "var_tiny.pth")


@pytest.fixture
def fake_hub(local_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("POPYOU_CACHE", str(tmp_path / "popyou-cache"))
    monkeypatch.setitem(P.GEN_DATA_PRESETS, "full", replace(P.GEN_DATA_PRESETS["full"], model="fake/sdxl"))
    monkeypatch.setitem(P.CAPTION_PRESETS, "full", replace(P.CAPTION_PRESETS["full"], model="fake/blip2"))
    monkeypatch.setitem(P.ENCODE_PRESETS, "full", replace(P.ENCODE_PRESETS["full"], siglip_model="hf-hub:fake/siglip",
                                                           siglip_pretrained=None, vqvae="fake/var/vae_tiny.pth"))
    monkeypatch.setitem(P.FINETUNE_PRESETS, "full", replace(P.FINETUNE_PRESETS["full"], var="fake/var/var_tiny.pth"))
    monkeypatch.setattr(P, "DEFAULT_VAE", "fake/var/vae_tiny.pth")
    repos = tmp_path / "repos"
    _sdxl_repo(repos / "fake/sdxl")
    _blip2_repo(repos / "fake/blip2")
    _spm_tokenizer_repo(repos / "fake/siglip-tok")
    _siglip_repo(repos / "fake/siglip", "fake/siglip-tok")
    _var_repo(repos / "fake/var")
    for repo in REPOS:
        folder = repos / repo
        local_hub.add_repo(repo, {str(f.relative_to(folder)): f for f in folder.rglob("*") if f.is_file()})
    return TinyHub(local_hub, Path(constants.HF_HUB_CACHE))


def test_download_then_every_stage_loads_offline(fake_hub):
    res = invoke("download", "--stages", "gen-data,caption,encode,finetune", "--device", "cpu")
    assert res.exit_code == 0, res.output
    for stage in ("gen-data", "caption", "encode", "finetune"):
        assert f"ok {stage}:" in res.output, res.output
    fetched = fake_hub.fetched
    assert "fake/sdxl/unet/diffusion_pytorch_model.safetensors" in fetched
    assert not [f for f in fetched if ".fp16." in f or "sd_single_file" in f]  # float32 on CPU: plain weights only
    assert {"fake/blip2/model.safetensors", "fake/blip2/processor_config.json"} <= fetched
    assert not {"fake/blip2/pytorch_model.bin", "fake/blip2/README.md"} & fetched
    assert {"fake/siglip-tok/spiece.model", "fake/siglip/open_clip_model.safetensors"} <= fetched
    assert {"fake/var/vae_tiny.pth", "fake/var/var_tiny.pth"} <= fetched
    assert "fake/siglip-tok/config.json" not in fetched  # the repo has none, and loading does not need one

    again = invoke("download", "--stages", "caption", "--device", "cpu", "--no-check")
    assert again.exit_code == 0 and "all in the cache" in again.output and "to fetch: 0 files" in again.output


def test_fp16_picks_the_fp16_variant_and_the_loader_agrees(fake_hub):
    from popyou_cli.download import Fetch, choose_files
    from popyou_cli.third_party.sdxl import text_to_image_variant

    chosen = choose_files(Fetch("gen-data", "fake/sdxl", "diffusers", dtype="fp16"), hub.file_sizes("fake/sdxl"))
    weights = [f for f in chosen if f.endswith(".safetensors")]
    assert weights and all(".fp16." in f for f in weights)
    assert {"unet/config.json", "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"} <= set(chosen)
    assert text_to_image_variant("fake/sdxl", torch.float16) == "fp16"  # the same rule, from the Hub's list
    assert text_to_image_variant("fake/sdxl", torch.float32) is None


def test_loader_errors_name_the_missing_file_and_the_command(fake_hub, monkeypatch):
    from huggingface_hub import constants

    from popyou_cli.third_party import load_captioner, load_siglip

    go_offline(monkeypatch)
    with pytest.raises(PopyouError) as info:
        load_captioner("fake/blip2", device="cpu")
    assert "nothing of fake/blip2 is in the Hugging Face cache" in str(info.value)
    assert "popyou download --stages caption" in str(info.value)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online again, to fetch some of the files
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("config.json", "processor_config.json", "tokenizer_config.json", "tokenizer.json"):
        hub.download_file("fake/blip2", name)
    hub.download_file("fake/siglip", "open_clip_config.json")
    hub.download_file("fake/siglip", "open_clip_model.safetensors")
    go_offline(monkeypatch)
    with pytest.raises(PopyouError) as info:
        load_captioner("fake/blip2", device="cpu")
    assert "fake/blip2/model.safetensors.index.json or model.safetensors" in str(info.value)

    with pytest.raises(PopyouError) as info:  # weights there, tokenizer not: the tokenizer is named, not the weights
        load_siglip("hf-hub:fake/siglip", None, device="cpu")
    message = str(info.value)
    assert "tokenizer 'fake/siglip-tok'" in message and "popyou download --stages encode" in message
    assert "\n" not in message


def test_the_full_preset_plan_names_the_real_repos():
    """What `popyou download` fetches for the real models (planning only: no network for these)."""
    from popyou_cli.download import make_plan

    plan = make_plan(["gen-data", "caption", "encode", "finetune"], device=torch.device("cpu"))
    got = {(f.stage, f.repo, f.kind) for f in plan.fetches}
    assert got == {("gen-data", "stabilityai/sdxl-turbo", "diffusers"),
                   ("caption", "Salesforce/blip2-opt-2.7b", "transformers"),
                   ("encode", "timm/ViT-B-16-SigLIP", "files"),  # open_clip's weights
                   ("encode", "timm/ViT-B-16-SigLIP", "tokenizer"),  # its Hugging Face tokenizer, same repo
                   ("encode", "FoundationVision/var", "files"), ("finetune", "FoundationVision/var", "files")}
    assert {c["load"] for c in plan.checks} == {"text_to_image", "captioner", "siglip", "vqvae", "var"}
    assert [c["dtype"] for c in plan.checks if "dtype" in c] == ["fp32", "fp32"]  # CPU: the plain fp32 files


def test_nothing_to_download_for_the_tiny_preset():
    res = invoke("download", "--preset", "tiny", "--stages", "gen-data,caption", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "nothing to download" in res.output


def test_no_bare_except_pass_in_loaders():
    """Swallowed errors hide real failures (a broken fp16 file used to fall back to fp32 silently). Loaders: the
    model families, VAR / VQ-VAE weights, the Hub, pipelines, the original model, download, the bench builds."""
    import re

    root = Path(__file__).resolve().parents[1] / "popyou_cli"
    loaders = [*root.glob("third_party/*.py"), *root.glob("models/*.py"), *root.glob("infer/*.py"),
               root / "core" / "hub.py", root / "download.py"]
    bare = re.compile(r"except\s*(?:\(?[\w., ]*Exception\)?)?\s*(?:as\s+\w+)?\s*:\s*(?:#[^\n]*)?\n\s*pass\b")
    assert len(loaders) > 10
    found = [str(path.relative_to(root)) for path in loaders if bare.search(path.read_text())]
    assert found == []
    assert bare.search("try:\n    x()\nexcept Exception:  # noqa: BLE001 - why\n    pass\n")


def test_known_library_warnings_are_filtered_at_the_source():
    """diffusers' SDXL pipeline calls its deprecated upcast_vae() on every fp16 batch: no FutureWarning per batch."""
    import warnings

    from popyou_cli.third_party import load_text_to_image
    from popyou_cli.third_party.common import filter_known_warnings

    filter_known_warnings.cache_clear()  # pytest restores the warning filters after every test
    pipe = load_text_to_image("tiny", device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        pipe.upcast_vae()
    assert not [w for w in caught if "upcast_vae" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the same call, unfiltered, does warn: the test sees what it filters
        pipe.upcast_vae()
    assert [w for w in caught if "upcast_vae" in str(w.message)]
