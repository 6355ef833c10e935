"""The transformers SigLIP text encoder object (third_party/hf_text.py) on the seed checkpoint's tiny text tower."""
import pytest
import torch

from conftest import golden_dir
from popyou_cli.third_party.hf_text import build_hf_text_encoder, load_hf_text_encoder
from popyou_cli.core.errors import PopyouError


@pytest.fixture(scope="module")
def seed_dir():
    d = golden_dir() / "seed_checkpoint"
    if not (d / "popyou-seed-tiny.ckpt").is_file():
        pytest.skip(f"seed checkpoint not found at {d} (set POPYOU_GOLDEN_DIR to the shared/golden folder)")
    return d


@pytest.fixture(scope="module")
def text_sd(seed_dir):
    sd = torch.load(seed_dir / "popyou-seed-tiny.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    pre = "siglip_text_encoder."
    return {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}  # the 4.x layout: text_model.*


@pytest.fixture(scope="module")
def enc(seed_dir, text_sd):
    return build_hf_text_encoder(str(seed_dir / "text_encoder"), str(seed_dir / "tokenizer"), state_dict=text_sd)


PROMPTS = ["a wizard funko pop", "a funko pop astronaut holding a guitar"]


def test_embeddings_unit_norm_float32(enc):
    emb = enc(PROMPTS)
    assert enc.dim == 32 and emb.shape == (2, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    assert enc.to("cpu") is enc and enc.device.type == "cpu"
    torch.testing.assert_close(enc(PROMPTS[:1]), emb[:1], atol=1e-6, rtol=0)  # a prompt ignores its batch
    ids = enc.tokenize(PROMPTS)
    assert ids["input_ids"].shape == (2, 16) and "attention_mask" in ids  # padded to the maximum, mask passed on


def test_both_key_layouts_give_the_same_encoder(seed_dir, text_sd, enc):
    assert all(k.startswith("text_model.") for k in text_sd)
    flat = {k[len("text_model."):]: v for k, v in text_sd.items()}  # the transformers 5.x layout
    other = build_hf_text_encoder(str(seed_dir / "text_encoder"), str(seed_dir / "tokenizer"), state_dict=flat)
    assert torch.equal(other(PROMPTS), enc(PROMPTS))


def test_long_prompt_is_truncated_with_a_warning(enc):
    long = " ".join(["wizard"] * 40)
    with pytest.warns(UserWarning, match="truncated"):
        emb = enc([long, PROMPTS[0]])
    assert emb.shape == (2, 32)
    torch.testing.assert_close(emb[1:], enc(PROMPTS[:1]), atol=1e-6, rtol=0)


def test_save_and_load_offline(enc, tmp_path):
    entry = enc.save_pretrained(tmp_path)
    assert entry == {"library": "transformers", "path": "text_encoder", "tokenizer": "tokenizer", "embedding": "text"}
    again = load_hf_text_encoder(tmp_path / "text_encoder", tokenizer=tmp_path / "tokenizer", device="cpu")
    assert torch.equal(again(PROMPTS), enc(PROMPTS))


def test_errors_are_one_line(seed_dir, text_sd, tmp_path):
    bad = dict(text_sd)
    bad["text_model.head.weight"] = torch.zeros(8, 32)
    del bad["text_model.head.bias"]
    with pytest.raises(PopyouError, match=r"missing 1: head.bias; mis-shaped 1: head.weight \(8, 32\) != \(32, 32\)"):
        build_hf_text_encoder(str(seed_dir / "text_encoder"), str(seed_dir / "tokenizer"), state_dict=bad)
    with pytest.raises(PopyouError, match="run once online") as e:
        build_hf_text_encoder("nobody-here/no-such-encoder", state_dict=text_sd)
    assert "\n" not in str(e.value)
    with pytest.raises(PopyouError, match="text encoder config"):
        build_hf_text_encoder(str(tmp_path), state_dict=text_sd)


def test_a_saved_tower_loads_without_transformers_with_the_same_numbers(enc, tmp_path):
    """siglip_text.py reads what save_pretrained wrote: the same tokens and embeddings as transformers' model,
    bit for bit (padding, truncation and the attention mask included)."""
    enc.save_pretrained(tmp_path)
    fast = load_hf_text_encoder(tmp_path / "text_encoder", tokenizer=tmp_path / "tokenizer", device="cpu")
    assert (type(fast.model).__name__, type(fast.tokenizer).__name__) == ("SiglipTextTower", "TokenizerFile")
    prompts = [*PROMPTS, "x", "A Wizard, Funko POP!", " ".join(["wizard"] * 40)]
    with pytest.warns(UserWarning, match="truncated"):
        want_ids, got_ids = enc.tokenize(prompts), fast.tokenize(prompts)
    assert want_ids.keys() == got_ids.keys() and all(torch.equal(want_ids[k], got_ids[k]) for k in want_ids)
    with pytest.warns(UserWarning, match="truncated"):
        assert torch.equal(fast(prompts), enc(prompts))
    assert fast.dim == enc.dim and fast.max_length == enc.max_length


def test_a_tower_the_plain_reader_does_not_know_goes_through_transformers(enc, tmp_path):
    import json

    enc.save_pretrained(tmp_path)
    cfg_path = tmp_path / "text_encoder" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "hidden_act": "relu"}))
    other = load_hf_text_encoder(tmp_path / "text_encoder", tokenizer=tmp_path / "tokenizer", device="cpu")
    assert type(other.model).__name__ == "SiglipTextModel"
