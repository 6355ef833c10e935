"""Tests of popyou_cli.third_party: the tiny stand-ins (offline, CPU) and the errors for real models not in the cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from popyou_cli import third_party as encoders
from popyou_cli.core.errors import PopyouError

# diffusers' Euler-ancestral scheduler calls np.array() on a torch tensor: numpy 2 warns, harmlessly
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _digest(module: torch.nn.Module) -> str:
    """Hash of a module's parameters and buffers (names, shapes, dtypes and exact bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _images() -> list[Image.Image]:
    rng = np.random.RandomState(0)
    noise = [Image.fromarray((rng.rand(80, 96, 3) * 255).astype("uint8")) for _ in range(2)]
    return noise + [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (40, 40), "blue")]


# ------------------------------------------------------------------------------------------------ text to image


def _generate(pipe, seed: int, prompt: str = "a funko pop figure of a wizard", **kwargs) -> np.ndarray:
    out = pipe(
        prompt,
        num_inference_steps=1,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return np.asarray(out.images[0])


@pytest.fixture(scope="module")
def tiny_pipe():
    return encoders.load_text_to_image("tiny", device="cpu", dtype="float32")


def test_tiny_text_to_image_is_deterministic_per_seed(tiny_pipe):
    first = _generate(tiny_pipe, 0)
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert first.std() > 0  # an image, not a constant
    np.testing.assert_array_equal(_generate(tiny_pipe, 0), first)
    assert not np.array_equal(_generate(tiny_pipe, 1), first)
    # the prompt conditions the image
    assert not np.array_equal(_generate(tiny_pipe, 0, prompt="a robot on a skateboard"), first)


def test_tiny_text_to_image_is_the_same_across_builds(tiny_pipe):
    rng_before = torch.get_rng_state()
    fresh = encoders.build_tiny_text_to_image()
    assert torch.equal(torch.get_rng_state(), rng_before), "building must not consume the global RNG"
    assert fresh is not tiny_pipe
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert _digest(getattr(fresh, part)) == _digest(getattr(tiny_pipe, part)), part
    np.testing.assert_array_equal(_generate(fresh, 3), _generate(tiny_pipe, 3))


def test_tiny_text_to_image_is_cached_and_sized(tiny_pipe):
    assert encoders.load_text_to_image("tiny", device="cpu", dtype=torch.float32) is tiny_pipe
    assert tiny_pipe.vae_scale_factor == 8
    assert type(tiny_pipe).__name__ == "StableDiffusionXLPipeline"
    assert tiny_pipe.scheduler.config.timestep_spacing == "trailing"
    # a batch of prompts, and the configurable default size
    batch = tiny_pipe(["a", "b"], num_inference_steps=1, guidance_scale=0.0, output_type="np").images
    assert batch.shape == (2, 64, 64, 3)
    small = encoders.load_text_to_image("tiny", device="cpu", dtype="float32", image_size=32)
    assert _generate(small, 0).shape == (32, 32, 3)
    with pytest.raises(PopyouError):
        encoders.load_text_to_image("tiny", device="cpu", image_size=30)


def test_clip_tokenizer_matches_open_clip():
    import open_clip

    texts = ["a funko pop figure of a man with a red hat!", "Café, 123 robots."]
    ours = encoders.clip_tokenizer()
    assert len(ours) == 49408 and ours.model_max_length == 77
    theirs = open_clip.get_tokenizer("ViT-B-32")(texts)  # open_clip's bundled SimpleTokenizer
    for text, ref in zip(texts, theirs):
        ids = ours(text).input_ids
        assert ids == ref[: len(ids)].tolist()
        assert ids[0] == ours.bos_token_id and ids[-1] == ours.eos_token_id
    byte_level = encoders.clip_tokenizer(byte_level=True)
    assert len(byte_level) == 514
    assert len(byte_level("abc").input_ids) == 2 + 3  # one token per character


# ------------------------------------------------------------------------------------------------ captioner


def _caption(net, processor, images, **kwargs) -> list[str]:
    inputs = processor(images=images, return_tensors="pt", **kwargs)
    ids = net.generate(**inputs, max_new_tokens=12)
    return processor.batch_decode(ids, skip_special_tokens=True)


def test_tiny_captioner_captions_pil_images_in_batches():
    net, processor = encoders.load_captioner("tiny", device="cpu", dtype="float32")
    assert type(net).__name__ == "Blip2ForConditionalGeneration"
    assert net.config.num_query_tokens == 4 and processor.num_query_tokens == 4
    assert processor.tokenizer.padding_side == "left"
    images = _images()
    captions = _caption(net, processor, images)
    assert len(captions) == len(images)
    assert all(isinstance(c, str) and c.strip() for c in captions)
    assert len(set(captions)) > 1  # the image reaches the caption
    assert _caption(net, processor, images[:1]) == captions[:1]  # batching does not change a caption
    # prompted captions, padded in a batch
    prompted = _caption(net, processor, images[:2], text=["a photo of", "a funko pop figure of a"], padding=True)
    assert prompted[0].startswith("a photo of") and prompted[1].startswith("a funko pop figure of a")


def test_tiny_captioner_is_the_same_across_builds():
    net, processor = encoders.load_captioner("tiny", device="cpu", dtype="float32")
    assert encoders.load_captioner("tiny", device="cpu", dtype="float32")[0] is net
    fresh_net, fresh_processor = encoders.build_tiny_captioner()
    assert _digest(fresh_net) == _digest(net)
    assert fresh_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert _caption(fresh_net, fresh_processor, _images()) == _caption(net, processor, _images())


# ------------------------------------------------------------------------------------------------ SigLIP


def test_tiny_siglip_embeddings_have_the_right_shape_and_unit_norm():
    model, preprocess, tokenizer = encoders.load_siglip("tiny", None, device="cpu")
    assert encoders.embedding_dim(model) == encoders.TINY_SIGLIP_EMBED_DIM
    assert hasattr(model, "logit_bias")  # SigLIP-style
    pixels = torch.stack([preprocess(im) for im in _images()])
    assert pixels.shape == (4, 3, 64, 64)
    image_emb = encoders.encode_images(model, pixels)
    text_emb = encoders.encode_texts(model, tokenizer, ["a red toy", "a blue robot", "a wizard"])
    assert image_emb.shape == (4, 32) and text_emb.shape == (3, 32)
    assert image_emb.dtype == torch.float32 and text_emb.dtype == torch.float32
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(text_emb[0], text_emb[1])
    assert not torch.allclose(image_emb[0], image_emb[2])
    assert encoders.encode_texts(model, tokenizer, "a red toy").shape == (1, 32)
    # the registered name is an alias of "tiny"
    assert encoders.load_siglip(encoders.TINY_SIGLIP_NAME, None, device="cpu")[0] is model


def test_tiny_siglip_is_the_same_across_builds():
    model, preprocess, tokenizer = encoders.load_siglip("tiny", None, device="cpu")
    fresh, fresh_preprocess, fresh_tokenizer = encoders.build_tiny_siglip()
    assert fresh is not model
    assert _digest(fresh) == _digest(model)
    pixels = torch.stack([preprocess(im) for im in _images()])
    assert torch.equal(pixels, torch.stack([fresh_preprocess(im) for im in _images()]))
    assert torch.equal(encoders.encode_images(fresh, pixels), encoders.encode_images(model, pixels))
    texts = ["a funko pop of a cat"]
    assert torch.equal(
        encoders.encode_texts(fresh, fresh_tokenizer, texts), encoders.encode_texts(model, tokenizer, texts)
    )


# ------------------------------------------------------------------------------------------------ other processes

_DIGEST_SCRIPT = r"""
import hashlib, json, sys
from popyou_cli import third_party as encoders

def digest(module):
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()

pipe = encoders.build_tiny_text_to_image()
net, processor = encoders.build_tiny_captioner()
siglip = encoders.build_tiny_siglip()[0]
json.dump({
    "unet": digest(pipe.unet), "vae": digest(pipe.vae), "text_encoder": digest(pipe.text_encoder),
    "text_encoder_2": digest(pipe.text_encoder_2), "blip2": digest(net),
    "blip2_vocab": sorted(processor.tokenizer.get_vocab().items()), "siglip": digest(siglip),
}, sys.stdout)
"""


def test_tiny_stand_ins_are_bit_identical_in_another_process():
    env = dict(os.environ, PYTHONHASHSEED="12345", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _DIGEST_SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    other = json.loads(proc.stdout)
    pipe = encoders.load_text_to_image("tiny", device="cpu", dtype="float32")
    net, processor = encoders.load_captioner("tiny", device="cpu", dtype="float32")
    siglip = encoders.load_siglip("tiny", None, device="cpu")[0]
    here = {
        "unet": _digest(pipe.unet), "vae": _digest(pipe.vae), "text_encoder": _digest(pipe.text_encoder),
        "text_encoder_2": _digest(pipe.text_encoder_2), "blip2": _digest(net),
        "blip2_vocab": [list(kv) for kv in sorted(processor.tokenizer.get_vocab().items())],
        "siglip": _digest(siglip),
    }
    assert other == here


# ------------------------------------------------------------------------------------------------ real models offline


@pytest.fixture
def hub_offline(monkeypatch):
    """Switch the Hub off for this test, whatever the environment says (no download may start)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _cached(repo: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename), str)


def _check_error(err: PopyouError, model: str) -> None:
    message = str(err)
    assert "\n" not in message
    assert repr(model) in message
    assert "not available offline" in message and "Hugging Face cache" in message


@pytest.mark.parametrize(
    ("load", "model", "repo", "filename"),
    [
        (encoders.load_text_to_image, "popyou-tests/no-such-sdxl", None, None),
        (encoders.load_captioner, "popyou-tests/no-such-blip2", None, None),
        (encoders.load_text_to_image, encoders.DEFAULT_TEXT_TO_IMAGE, encoders.DEFAULT_TEXT_TO_IMAGE, "model_index.json"),
        (encoders.load_captioner, encoders.DEFAULT_CAPTIONER, encoders.DEFAULT_CAPTIONER, "config.json"),
    ],
    ids=["sdxl-unknown", "blip2-unknown", "sdxl-default", "blip2-default"],
)
def test_real_hub_model_missing_offline_is_a_clear_error(hub_offline, load, model, repo, filename):
    if repo and _cached(repo, filename):
        pytest.skip(f"{repo} is in the Hugging Face cache")
    with pytest.raises(PopyouError) as info:
        load(model, device="cpu", dtype="float32")
    _check_error(info.value, model)


@pytest.mark.parametrize(
    ("model", "pretrained", "label"),
    [
        (encoders.DEFAULT_SIGLIP, encoders.DEFAULT_SIGLIP_PRETRAINED, "ViT-B-16-SigLIP pretrained=webli"),
        ("hf-hub:popyou-tests/no-such-siglip", None, "hf-hub:popyou-tests/no-such-siglip"),
    ],
    ids=["siglip-default", "siglip-hf-hub-unknown"],
)
def test_real_siglip_missing_offline_is_a_clear_error(hub_offline, model, pretrained, label):
    if model == encoders.DEFAULT_SIGLIP and (
        _cached("timm/ViT-B-16-SigLIP", "open_clip_model.safetensors")
        or _cached("timm/ViT-B-16-SigLIP", "open_clip_pytorch_model.bin")
    ):
        pytest.skip("ViT-B-16-SigLIP is in the Hugging Face cache")
    with pytest.raises(PopyouError) as info:
        encoders.load_siglip(model, pretrained, device="cpu")
    _check_error(info.value, label)


def test_bad_model_names_are_clear_errors():
    with pytest.raises(PopyouError, match="does not exist"):
        encoders.load_text_to_image("/no/such/folder/popyou", device="cpu")
    with pytest.raises(PopyouError, match="does not exist"):
        encoders.load_captioner("./no-such-folder-popyou", device="cpu")
    with pytest.raises(PopyouError, match="unknown open_clip model"):
        encoders.load_siglip("no-such-open-clip-model", None, device="cpu")
    with pytest.raises(PopyouError, match="neither one of its tags"):
        encoders.load_siglip("ViT-B-16-SigLIP", "no-such-tag", device="cpu")
    with pytest.raises(PopyouError, match="does not exist"):
        encoders.load_siglip("ViT-B-16-SigLIP", "/no/such/checkpoint.bin", device="cpu")
    with pytest.raises(PopyouError, match="does not exist"):
        encoders.load_siglip("local-dir:/no/such/folder/popyou", None, device="cpu")
    with pytest.raises(PopyouError, match="pretrained tag"):
        encoders.load_siglip("ViT-B-32", None, device="cpu")  # several tags: random weights are never implied
    with pytest.raises(PopyouError, match="unknown dtype"):
        encoders.load_captioner("tiny", device="cpu", dtype="int7")
