"""`popyou import` and the default pipeline, against the original PopYOU model's two layouts in miniature
(shared/golden/seed_checkpoint: the Lightning checkpoint; shared/golden/space_checkpoint: the demo Space's
VARtext_v1.pth, a plain state dict without the VQ-VAE encoder; each with the original inference's outputs)."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import golden_dir
from helpers import invoke, one_line_error
from popyou_cli.infer import original
from popyou_cli.third_party.hf_text import load_hf_text_encoder
from popyou_cli.core.errors import PopyouError
from popyou_cli.models.adapter import load_adapter
from popyou_cli.models.checkpoints import build_tiny_var, load_var, load_vqvae, save_model
from popyou_cli.models.generate import generate

# golden folder -> the model file in it; both hold cases.json, expected.safetensors, tokenizer/, text_encoder/
LAYOUTS = {"seed_checkpoint": "popyou-seed-tiny.ckpt", "space_checkpoint": "VARtext_v1.pth"}


def _golden_model_dir(name: str):
    d = golden_dir() / name
    if not (d / LAYOUTS[name]).is_file():
        pytest.skip(f"{LAYOUTS[name]} not found in {d} (set POPYOU_GOLDEN_DIR to the shared/golden folder)")
    return d


@pytest.fixture(scope="module")
def seed_dir():
    return _golden_model_dir("seed_checkpoint")


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def model_dir(request):
    """Each layout in turn: the golden cases must hold for both."""
    return _golden_model_dir(request.param)


@pytest.fixture(scope="module")
def cases(model_dir):
    meta = json.loads((model_dir / "cases.json").read_text())
    return meta, {c["name"]: c for c in meta["cases"]}, load_file(str(model_dir / "expected.safetensors"))


@pytest.fixture(scope="module")
def imported(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("import") / "popyou"
    res = invoke("import", model_dir / LAYOUTS[model_dir.name], "--out", out, "--text-encoder",
                 model_dir / "text_encoder", "--tokenizer", model_dir / "tokenizer")
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def parts(imported):
    var, _ = load_var(str(imported / "var"))
    vqvae = load_vqvae(str(imported / "vqvae"), patch_nums=var.config.patch_nums)
    adapter, _ = load_adapter(imported)
    enc = load_hf_text_encoder(imported / "text_encoder", tokenizer=imported / "tokenizer")
    return var, vqvae, adapter, enc


def _ckpt(seed_dir):
    return torch.load(seed_dir / "popyou-seed-tiny.ckpt", map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------ the golden cases
CASE_NAMES = ["wizard_greedy", "wizard_beta0", "astronaut_defaults"]


def test_cases_json_lists_the_tested_cases(cases):
    assert sorted(cases[1]) == sorted(CASE_NAMES)  # a new case in cases.json must be added to CASE_NAMES


def test_pipeline_json_and_folder(imported, model_dir, cases):
    pj = json.loads((imported / "pipeline.json").read_text())
    assert pj["var"] == "var" and pj["vqvae"] == "vqvae"
    assert pj["encoder"] == {"library": "transformers", "path": "text_encoder", "tokenizer": "tokenizer",
                             "embedding": "text"}
    assert pj["sampling"] == {"class_id": cases[0]["class_id"], "alpha": 1.0, "beta": 1.0, "cfg": 1.5, "top_k": 0,
                              "top_p": 0.9, "more_smooth": False}
    prov = pj["provenance"]
    assert prov["kind"] == "original PopYOU model" and prov["filename"] == LAYOUTS[model_dir.name]
    import hashlib

    assert prov["sha256"] == hashlib.sha256((model_dir / LAYOUTS[model_dir.name]).read_bytes()).hexdigest()
    assert json.loads((imported / "vqvae" / "config.json").read_text())["config"]["resize"] == "bilinear"
    assert sorted(p.name for p in imported.iterdir()) == ["adapter.json", "adapter.safetensors", "pipeline.json",
                                                         "text_encoder", "tokenizer", "var", "vqvae"]


def test_space_layout_is_decoder_side_only(imported, model_dir, cases):
    """The Space's file has no vae.encoder.*: the VQ-VAE is saved decoder side only, class 578 comes from the
    original demo, and encoding through it says where the encoder is."""
    keys = load_file(str(imported / "vqvae" / "model.safetensors")).keys()
    has_encoder = json.loads((imported / "vqvae" / "config.json").read_text())["config"]["has_encoder"]
    if model_dir.name == "seed_checkpoint":
        assert has_encoder and any(k.startswith("encoder.") for k in keys)
        return
    assert not has_encoder and not any(k.startswith("encoder.") for k in keys)
    assert any(k.startswith("decoder.") for k in keys) and "quantize.embedding.weight" in keys
    assert cases[0]["class_id"] == 578 == json.loads((imported / "pipeline.json").read_text())["sampling"]["class_id"]
    vqvae = load_vqvae(str(imported / "vqvae"))
    with pytest.raises(PopyouError, match="saved without its encoder"):
        vqvae.encode_codes(torch.zeros(1, 3, 64, 64))


def test_class_id_option_overrides_the_demo_class(tmp_path):
    d = _golden_model_dir("space_checkpoint")
    args = ("import", d / LAYOUTS[d.name], "--text-encoder", d / "text_encoder", "--tokenizer", d / "tokenizer")
    res = invoke(*args, "--out", tmp_path / "a", "--class-id", 3)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "a" / "pipeline.json").read_text())["sampling"]["class_id"] == 3
    assert "--class-id" in one_line_error(invoke(*args, "--out", tmp_path / "b", "--class-id", 1000))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("name", CASE_NAMES)
def test_text_path_matches_original(parts, cases, name):
    _, _, adapter, enc = parts
    case, expected = cases[1][name], cases[2]
    ids = enc.tokenize([case["prompt"]])["input_ids"]
    assert torch.equal(ids, expected[f"{name}_input_ids"])
    torch.testing.assert_close(enc.pooled([case["prompt"]]), expected[f"{name}_pooled"], atol=1e-5, rtol=0)
    with torch.no_grad():
        delta = adapter(enc([case["prompt"]]))
    torch.testing.assert_close(delta, expected[f"{name}_cond_delta"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_image_matches_original(parts, cases, name):
    var, vqvae, adapter, enc = parts
    meta, case, expected = cases[0], cases[1][name], cases[2]
    with torch.no_grad():
        delta = adapter(enc([case["prompt"]]))
    img = generate(var, vqvae, 1, meta["class_id"], cfg=case["cfg"], top_k=case["top_k"], top_p=case["top_p"],
                   generator=torch.Generator().manual_seed(case["seed"]), cond_delta=delta, alpha=1.0,
                   beta=case["beta"])
    torch.testing.assert_close(img, expected[f"{name}_img"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sample_command_writes_original_png(imported, cases, name, tmp_path):
    case, expected = cases[1][name], cases[2]
    res = invoke("sample", case["prompt"], "--pipeline", imported, "--n", 1, "--beta", case["beta"], "--seed",
                 case["seed"], "--top-k", case["top_k"], "--top-p", case["top_p"], "--cfg", case["cfg"], "--device",
                 "cpu", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    (png,) = tmp_path.glob("p0000_seed*.png")
    got = np.asarray(Image.open(png).convert("RGB")).astype(int)
    truncated = expected[f"{name}_seed_u8"][0].permute(1, 2, 0).numpy().astype(int)
    rounded = (expected[f"{name}_img"][0].permute(1, 2, 0) * 255).round().numpy().astype(int)
    assert min(np.abs(got - truncated).max(), np.abs(got - rounded).max()) <= 1


# ------------------------------------------------------------------------------------------ the LoRA merge
def test_merge_lora_by_hand():
    W = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    A = torch.tensor([[1.0, 0.0, -1.0]])  # r = 1
    B = torch.tensor([[0.5], [-2.0]])
    sd = {"fc.base_layer.weight": W, "fc.base_layer.bias": torch.zeros(2), "fc.lora_A.default.weight": A,
          "fc.lora_B.default.weight": B, "emb.weight": torch.ones(3)}
    merged, n = original.merge_lora(sd, lora_alpha=32)
    # W + (32 / 1) * B @ A, written out: row 0 adds 16 * [1, 0, -1], row 1 adds -64 * [1, 0, -1]
    assert n == 1 and sorted(merged) == ["emb.weight", "fc.bias", "fc.weight"]
    assert merged["fc.weight"].tolist() == [[17.0, 2.0, -13.0], [-60.0, 5.0, 70.0]]
    assert torch.equal(W, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))  # the loaded tensor is left alone


def _state_dict(model_dir):
    """The model file's tensors: the Space's file is the state dict itself, the Lightning one holds it."""
    loaded = torch.load(model_dir / LAYOUTS[model_dir.name], map_location="cpu", weights_only=True)
    return loaded.get("state_dict", loaded)


def test_imported_var_holds_merged_weights(imported, model_dir):
    sd = _state_dict(model_dir)
    got = load_file(str(imported / "var" / "model.safetensors"))
    pre = "var.base_model.model.blocks.0.ffn.fc1."
    A, B = sd[pre + "lora_A.default.weight"], sd[pre + "lora_B.default.weight"]
    want = sd[pre + "base_layer.weight"] + (32 / A.shape[0]) * (B @ A)  # lora_alpha 32, r from the tensors
    assert A.shape[0] == 8 and B.abs().max() > 0
    torch.testing.assert_close(got["blocks.0.ffn.fc1.weight"], want, atol=1e-6, rtol=0)
    # the original never called mat_qkv as a module: its LoRA B is zero and the merge leaves the base weight
    assert torch.equal(got["blocks.0.attn.mat_qkv.weight"], sd["var.base_model.model.blocks.0.attn.mat_qkv.base_layer.weight"])


def test_plain_var_and_5x_text_layout_import_the_same(model_dir, imported, tmp_path):
    """A merged VAR under var.* and text weights without text_model. give the same folder as the peft one."""
    merged = load_file(str(imported / "var" / "model.safetensors"))
    sd = {k: v for k, v in _state_dict(model_dir).items() if not k.startswith("var.")}
    sd = {k.replace("siglip_text_encoder.text_model.", "siglip_text_encoder."): v for k, v in sd.items()}
    sd.update({f"var.{k}": v for k, v in merged.items()})
    if model_dir.name == "seed_checkpoint":  # the same layout as the original: Lightning keeps its class id
        sd = {**_ckpt(model_dir), "state_dict": sd}
    torch.save(sd, tmp_path / "merged.ckpt")
    out = tmp_path / "out"
    res = invoke("import", tmp_path / "merged.ckpt", "--out", out, "--text-encoder", model_dir / "text_encoder",
                 "--tokenizer", model_dir / "tokenizer")
    assert res.exit_code == 0, res.output
    for part in ("var/model.safetensors", "text_encoder/model.safetensors", "adapter.safetensors"):
        a, b = load_file(str(out / part)), load_file(str(imported / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


# ------------------------------------------------------------------------------------------ bad input
def _bad(seed_dir, tmp_path, source, text, *extra):
    out = tmp_path / "out"
    res = invoke("import", source, "--out", out, "--text-encoder", seed_dir / "text_encoder", "--tokenizer",
                 seed_dir / "tokenizer", *extra)
    line = one_line_error(res)
    assert text in line, line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return line


def test_official_var_state_dict(seed_dir, tmp_path):
    torch.save(build_tiny_var().state_dict(), tmp_path / "var_d16.pth")
    line = _bad(seed_dir, tmp_path, tmp_path / "var_d16.pth", "a plain VAR state dict")
    assert "import expects the original PopYOU model" in line


def test_popyou_model_folder(seed_dir, tmp_path):
    save_model(build_tiny_var(), tmp_path / "model")
    _bad(seed_dir, tmp_path, tmp_path / "model", "already a popyou folder")


def test_random_and_truncated_files(seed_dir, tmp_path):
    (tmp_path / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    _bad(seed_dir, tmp_path, tmp_path / "random.ckpt", "not a PyTorch checkpoint")
    data = (seed_dir / "popyou-seed-tiny.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    _bad(seed_dir, tmp_path, tmp_path / "cut.ckpt", "truncated")


def test_pickled_object_is_refused(seed_dir, tmp_path):
    import argparse

    ckpt = _ckpt(seed_dir)
    torch.save({**ckpt, "hyper_parameters": argparse.Namespace(start_class_id=7)}, tmp_path / "pickle.ckpt")
    _bad(seed_dir, tmp_path, tmp_path / "pickle.ckpt", "refused to unpickle argparse.Namespace")


def test_no_adapter(seed_dir, tmp_path):
    ckpt = _ckpt(seed_dir)
    sd = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("adapter.")}
    torch.save({**ckpt, "state_dict": sd}, tmp_path / "classonly.ckpt")
    _bad(seed_dir, tmp_path, tmp_path / "classonly.ckpt", "no adapter.* weights")


def test_unknown_and_missing_keys_in_one_message(seed_dir, tmp_path):
    ckpt = _ckpt(seed_dir)
    sd = dict(ckpt["state_dict"])
    sd["var.base_model.model.extra.weight"] = torch.zeros(1)
    del sd["var.base_model.model.head_nm.ada_lin.1.base_layer.bias"]
    torch.save({**ckpt, "state_dict": sd}, tmp_path / "keys.ckpt")
    line = _bad(seed_dir, tmp_path, tmp_path / "keys.ckpt", "missing 1: head_nm.ada_lin.1.bias")
    assert "unexpected 1: extra.weight" in line
    sd = dict(ckpt["state_dict"], **{"optimizer.step": torch.zeros(1)})
    torch.save({**ckpt, "state_dict": sd}, tmp_path / "prefix.ckpt")
    _bad(seed_dir, tmp_path, tmp_path / "prefix.ckpt", "unexpected keys outside var./vae./adapter./siglip_text_encoder. 1: optimizer.step")


def test_width_mismatches(seed_dir, tmp_path):
    ckpt = _ckpt(seed_dir)
    sd = dict(ckpt["state_dict"])
    sd["adapter.layer2.weight"], sd["adapter.layer2.bias"] = torch.zeros(64, 1024), torch.zeros(64)
    sd["adapter.norm2.weight"], sd["adapter.norm2.bias"] = torch.ones(64), torch.zeros(64)
    torch.save({**ckpt, "state_dict": sd}, tmp_path / "narrow.ckpt")
    _bad(seed_dir, tmp_path, tmp_path / "narrow.ckpt", "the adapter outputs 64 values but the VAR is 128 wide")
    # without text weights the encoder's own are used: here a 16-wide encoder against the 32-wide adapter
    from transformers import AutoConfig, SiglipTextModel

    cfg = AutoConfig.from_pretrained(seed_dir / "text_encoder")
    cfg.hidden_size = cfg.projection_size = 16
    SiglipTextModel(cfg).save_pretrained(tmp_path / "enc16")
    sd = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("siglip_text_encoder.")}
    torch.save({**ckpt, "state_dict": sd}, tmp_path / "notext.ckpt")
    out = tmp_path / "out"
    res = invoke("import", tmp_path / "notext.ckpt", "--out", out, "--text-encoder", tmp_path / "enc16", "--tokenizer",
                 seed_dir / "tokenizer")
    assert "gives 16-wide embeddings but the adapter reads 32" in one_line_error(res)
    assert not out.exists()


def test_existing_out_needs_overwrite(seed_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ("import", seed_dir / "popyou-seed-tiny.ckpt", "--out", out, "--text-encoder", seed_dir / "text_encoder",
            "--tokenizer", seed_dir / "tokenizer")
    assert "--overwrite" in one_line_error(invoke(*args))
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only a folder popyou made: a user's folder stays as it is
    assert "popyou did not make it" in one_line_error(invoke(*args, "--overwrite"))
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert invoke(*args).exit_code == 0  # an empty folder takes an import
    res = invoke(*args, "--overwrite")  # and an imported one is replaced
    assert res.exit_code == 0, res.output
    assert (out / "pipeline.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_never_deletes_home_or_the_source(seed_dir, tmp_path, monkeypatch):
    """--out ~ or the folder holding the checkpoint (with its tokenizer) is refused, and nothing is deleted."""
    models = tmp_path / "models"
    shutil.copytree(seed_dir, models)
    (models / "pipeline.json").write_text("{}")  # even a folder that looks like popyou's
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    args = ("--text-encoder", models / "text_encoder", "--tokenizer", models / "tokenizer", "--overwrite")
    line = one_line_error(invoke("import", models / "popyou-seed-tiny.ckpt", "--out", models, *args))
    assert "overlaps input" in line
    assert (models / "popyou-seed-tiny.ckpt").is_file() and (models / "tokenizer").is_dir()
    line = one_line_error(invoke("import", models / "popyou-seed-tiny.ckpt", "--out", tmp_path / "home", *args))
    assert "home folder" in line and (tmp_path / "home" / "notes.txt").read_text() == "mine"


def test_two_imports_into_one_out_and_a_killed_one_leaves_nothing(seed_dir, tmp_path):
    from popyou_cli.core.locks import FolderLock

    out = tmp_path / "out"
    args = ("import", seed_dir / "popyou-seed-tiny.ckpt", "--out", out, "--text-encoder", seed_dir / "text_encoder",
            "--tokenizer", seed_dir / "tokenizer")
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from popyou_cli.core.locks import FolderLock; "
                               f"lock = FolderLock({str(out)!r}); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        out.mkdir()
        assert holder.stdout.readline().strip() == "locked"
        assert "in use by" in one_line_error(invoke(*args, "--overwrite"))
    finally:
        holder.kill()
        holder.wait()
    # what a kill -9 of an import leaves beside --out (its hidden temporary, named with its dead PID) goes away
    orphan = tmp_path / f".out.{holder.pid}.0123abcd.tmp"
    (orphan / "var").mkdir(parents=True)
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert not orphan.exists() and (out / "pipeline.json").is_file()
    FolderLock(out).release()  # free again


# ------------------------------------------------------------------------------------------ the resize mode
def test_reference_resize_would_not_match(parts, imported, cases):
    """The bilinear quantizer is what makes the import faithful: the reference resizing gives another image."""
    var, _, adapter, enc = parts
    meta, case, expected = cases[0], cases[1]["astronaut_defaults"], cases[2]
    reference = load_vqvae(str(imported / "vqvae"), resize="reference")
    with torch.no_grad():
        delta = adapter(enc([case["prompt"]]))
    img = generate(var, reference, 1, meta["class_id"], cfg=case["cfg"], top_k=case["top_k"], top_p=case["top_p"],
                   generator=torch.Generator().manual_seed(case["seed"]), cond_delta=delta, beta=case["beta"])
    assert (img - expected["astronaut_defaults_img"]).abs().max() > 1e-2


def test_resize_mode_recorded_and_loaded(tmp_path):
    from popyou_cli.models.vqvae import VQVAEConfig

    assert VQVAEConfig().resize == "reference"
    assert load_vqvae("tiny").quantize.up_mode == "bicubic"  # the default stays the reference VAR's
    save_model(load_vqvae("tiny", resize="bilinear"), tmp_path / "vae")
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["config"]["resize"] == "bilinear"
    vae = load_vqvae(str(tmp_path / "vae"))
    assert vae.config.resize == "bilinear" and (vae.quantize.down_mode, vae.quantize.up_mode) == ("bilinear",) * 2
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    del cfg["config"]["resize"]  # a folder written before the setting existed
    (tmp_path / "vae" / "config.json").write_text(json.dumps(cfg))
    assert load_vqvae(str(tmp_path / "vae")).config.resize == "reference"
    with pytest.raises(PopyouError, match="unknown VQ-VAE resize mode 'nearest'"):
        VQVAEConfig(resize="nearest")


def test_bilinear_quantizer_everywhere():
    """encode, teacher forcing, codes_to_fhat and sampling's next_ar_input all resize bilinearly, consistently."""
    import torch.nn.functional as F

    vae, ref = load_vqvae("tiny", resize="bilinear"), load_vqvae("tiny")
    q, pns = vae.quantize, vae.patch_nums
    f = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    codes = q.encode(f)
    # scale 0 by hand: f resized bilinearly to 1x1 (the 4 centre values), then the nearest code
    z0 = F.interpolate(f, size=(1, 1), mode="bilinear").flatten(1)
    assert torch.equal(codes[0][:, 0], torch.cdist(z0, q.embedding.weight).argmin(1))
    assert not all(torch.equal(a, b) for a, b in zip(codes, ref.quantize.encode(f)))
    torch.testing.assert_close(q.codes_to_fhat(codes), q.encode(f, to_fhat=True)[-1], atol=1e-5, rtol=0)
    f_hat, inputs = torch.zeros_like(f), []
    for si, pn in enumerate(pns):
        f_hat, nxt = q.next_ar_input(si, f_hat, q.codes_to_maps(codes)[si])
        if si == 0:  # by hand: phi(bilinear up of the 1x1 map), then bilinear down to 2x2
            h = q.phi(0, F.interpolate(q.codes_to_maps(codes)[0], size=(4, 4), mode="bilinear"))
            torch.testing.assert_close(nxt, F.interpolate(h, size=(2, 2), mode="bilinear"), atol=1e-6, rtol=0)
        if si < len(pns) - 1:
            inputs.append(nxt.flatten(2).transpose(1, 2))
    torch.testing.assert_close(q.codes_to_var_input(codes), torch.cat(inputs, 1), atol=1e-6, rtol=0)
    assert not torch.allclose(q.codes_to_var_input(codes), ref.quantize.codes_to_var_input(codes), atol=1e-3)


def test_bench_import_tiny(tmp_path):
    """`popyou bench import` builds a checkpoint in the original layout, imports it in a child, reports memory."""
    res = invoke("bench", "import", "--arch", "tiny", "--work", tmp_path, "--out", tmp_path / "bench.json")
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "bench.json").read_text())
    assert got["peak_rss_mib"] >= got["baseline_rss_mib"] > 0 and got["seconds"] > 0
    assert got["checkpoint_mib"] > 0 and got["pipeline_mib"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # its temporary files are gone
