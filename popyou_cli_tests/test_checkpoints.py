"""Official architectures on the meta device, config inference, and strict loading from every file form."""
import json

import pytest
import torch
from safetensors.torch import save_file

from popyou_cli.core.errors import PopyouError
from popyou_cli.models.checkpoints import (check_keys, infer_var_config, infer_vqvae_config, load_var, load_vqvae,
                                           read_state_dict, save_model)
from popyou_cli.models.var import VAR, VARConfig
from popyou_cli.models.vqvae import VQVAE, VQVAEConfig

D36_PATCH_NUMS = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@pytest.fixture(scope="module")
def keys_full(golden):
    return json.loads((golden / "keys_full.json").read_text())


def _meta_sd(entry):
    dt = {"float32": torch.float32, "int64": torch.int64}
    return {k: torch.empty(v["shape"], dtype=dt[v["dtype"]], device="meta") for k, v in entry["keys"].items()}


def _assert_same_keys(model, entry):
    sd = model.state_dict()
    assert list(sd) == list(entry["keys"]), "key names or order differ from the official checkpoint"
    for k, v in entry["keys"].items():
        assert list(sd[k].shape) == v["shape"], k
        assert str(sd[k].dtype).replace("torch.", "") == v["dtype"], k
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == entry["num_params"]


def test_official_vqvae_keys(keys_full):
    with torch.device("meta"):
        vae = VQVAE(VQVAEConfig())
    _assert_same_keys(vae, keys_full["vae_ch160v4096z32"])
    assert infer_vqvae_config(_meta_sd(keys_full["vae_ch160v4096z32"])) == VQVAEConfig()


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_official_var_keys_and_inferred_config(keys_full, depth):
    entry = keys_full[f"var_d{depth}"]
    with torch.device("meta"):
        var = VAR(VARConfig.official(depth))
    _assert_same_keys(var, entry)
    assert entry["num_heads"] == depth and entry["embed_dim"] == 64 * depth
    assert infer_var_config(_meta_sd(entry)) == VARConfig.official(depth)


def test_shared_adaln_d36_builds_and_round_trips():
    cfg = VARConfig.official(36, shared_aln=True, patch_nums=D36_PATCH_NUMS)
    with torch.device("meta"):
        var = VAR(cfg)
    sd = var.state_dict()
    assert "shared_ada_lin.1.weight" in sd and "blocks.0.ada_gss" in sd and "blocks.0.ada_lin.1.weight" not in sd
    assert sd["pos_1LC"].shape == (1, sum(p * p for p in D36_PATCH_NUMS), 64 * 36)
    no_lvl = {k: v for k, v in sd.items() if k != "lvl_1L"}  # patch_nums from (S, L) alone
    assert infer_var_config(no_lvl) == cfg


def _tiny_var(**kw):
    torch.manual_seed(0)
    cfg = VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=5, vocab_size=32, z_channels=8, patch_nums=(1, 2, 3), **kw)
    return VAR(cfg).eval()


def test_every_file_form_loads_the_same_weights(tmp_path):
    var = _tiny_var(drop_path_rate=0.1 * 2 / 24)  # a training setting: inferred as the official recipe's
    sd = var.state_dict()
    torch.save(sd, tmp_path / "bare.pth")
    torch.save({"trainer": {"var_wo_ddp": sd, "vae_local": {}}, "epoch": 3}, tmp_path / "nested.pth")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "ddp.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    save_model(var, tmp_path / "folder", extra={"class_names": list("abcde")})
    for spec in ["bare.pth", "nested.pth", "ddp.pth", "w.safetensors", "folder"]:
        loaded, meta = load_var(str(tmp_path / spec))
        assert loaded.config == var.config, spec
        for k, v in sd.items():
            assert torch.equal(loaded.state_dict()[k], v), (spec, k)
    assert load_var(str(tmp_path / "folder"))[1]["class_names"] == list("abcde")


def test_strict_loading_lists_every_bad_key(tmp_path):
    var = _tiny_var()
    sd = dict(var.state_dict())
    del sd["head.bias"]
    sd["extra.weight"] = torch.zeros(1)
    with torch.device("meta"):
        other = VAR(VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=6, vocab_size=32, z_channels=8, patch_nums=(1, 2, 3)))
    with pytest.raises(PopyouError) as e:
        check_keys(other, sd, "x.pth")
    msg = str(e.value)
    assert "missing 1: head.bias" in msg and "unexpected 1: extra.weight" in msg and "class_emb.weight (6, 64) != (7, 64)" in msg
    assert "\n" not in msg


def test_bad_files_give_one_line_errors(tmp_path):
    (tmp_path / "notes.pth").write_text("hello, not a checkpoint")
    torch.save(_tiny_var().state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    torch.save({"step": 3}, tmp_path / "nodict.pth")
    for name in ["notes.pth", "cut.pth", "cut.safetensors", "nodict.pth"]:
        with pytest.raises(PopyouError) as e:
            load_var(str(tmp_path / name))
        assert "\n" not in str(e.value) and name in str(e.value), str(e.value)
    with pytest.raises(PopyouError, match="no such file"):
        load_var(str(tmp_path / "missing.pth"))
    with pytest.raises(PopyouError, match="does not look like a VAR"):  # a VQ-VAE file given as --var
        vae_sd = VQVAE(VQVAEConfig(vocab_size=16, z_channels=8, ch=32, patch_nums=(1, 2))).state_dict()
        save_file({k: v.contiguous() for k, v in vae_sd.items()}, str(tmp_path / "vae.safetensors"))
        load_var(str(tmp_path / "vae.safetensors"))


def test_hub_spec_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PopyouError, match="FoundationVision/var"):
        load_var("FoundationVision/var")


def test_weights_only_refuses_pickled_objects(tmp_path):
    import collections

    torch.save({"weights": collections.Counter(a=1)}, tmp_path / "evil.pth")
    with pytest.raises(PopyouError):
        read_state_dict(tmp_path / "evil.pth", "var")


def test_vqvae_round_trip_and_ema_buffer_of_other_size(tmp_path, golden):
    vae = load_vqvae(str(golden / "tiny_vae.safetensors"), patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert vae.quantize.ema_vocab_hit_SV.shape == (10, 64)  # the file holds [4, 64]; replaced as the reference does
    save_model(vae, tmp_path / "vae")
    again = load_vqvae(str(tmp_path / "vae"))
    assert again.config == vae.config
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), again.state_dict().values()))


def test_tiny_stand_ins_are_identical_in_every_build():
    a, _ = load_var("tiny")
    b, _ = load_var("tiny")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    va, vb = load_vqvae("tiny"), load_vqvae("tiny")
    assert all(torch.equal(x, y) for x, y in zip(va.state_dict().values(), vb.state_dict().values()))
    assert a.config.vocab_size == va.config.vocab_size and a.config.patch_nums == va.patch_nums
    assert va.config.image_size == 64
