"""Captioner: BLIP-2 through transformers (the caption stage), and its tiny stand-in."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from popyou_cli.third_party.common import _load_or_explain, _version_at_least, cached_json, is_tiny, missing_from_cache, seeded

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

DEFAULT_CAPTIONER = "Salesforce/blip2-opt-2.7b"
TINY_CAPTIONER_SEED = 1002  # seed of the tiny stand-in's random weights (each family has its own)
TINY_CAPTIONER_IMAGE_SIZE = 64
TINY_CAPTIONER_QUERY_TOKENS = 4


def load_captioner(
    model: str = DEFAULT_CAPTIONER,
    *,
    device: Any = "cpu",
    dtype: Any = None,
):
    """``(Blip2ForConditionalGeneration, processor)``: ``"tiny"`` or a Hub id / local folder (default BLIP-2 OPT-2.7b).

    Caption with ``inputs = processor(images=pil_images, return_tensors="pt")`` (plus ``text=`` prompts for
    prompted captions), ``ids = model.generate(**inputs.to(device, dtype), max_new_tokens=...)`` and
    ``processor.batch_decode(ids, skip_special_tokens=True)``. The tokenizer pads on the left, as batched
    generation with a decoder-only language model needs. The model is in eval mode.
    """
    from popyou_cli.core.devices import resolve_device, resolve_dtype  # torch: imported on use (see the package docstring)

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, "data")
    if is_tiny(model):
        return _tiny_captioner(dev, dt)

    def load():
        import transformers
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        dtype_kw = {"dtype": dt} if _version_at_least(transformers, "4.56") else {"torch_dtype": dt}
        processor = Blip2Processor.from_pretrained(model)
        net = Blip2ForConditionalGeneration.from_pretrained(model, **dtype_kw)
        return net, processor

    net, processor = _load_or_explain("captioning model", model, load, stage="caption",
                                      missing=lambda: missing_from_cache(model, captioner_files(model)))
    return _ready(net, processor, dev, model)


def _ready(net, processor, device, source: str):
    """What every captioner goes through after it is built or loaded: the query-token check, left padding,
    the device, eval mode."""
    match_query_tokens(net, processor, source)
    processor.tokenizer.padding_side = "left"
    return net.to(device).eval(), processor


def match_query_tokens(net, processor, source: str) -> None:
    """Make sure BLIP-2 sees the picture: its processor must put as many image placeholders in front of the text
    as the model has query tokens, with the model's image token id. transformers 5 inserts none when the
    processor's ``num_query_tokens`` is missing, and every caption is then a guess from the text alone, with no
    error. Missing: taken from the model. Different: a PopyouError (a mismatched processor or model)."""
    from popyou_cli.core.errors import PopyouError

    want = int(net.config.num_query_tokens)
    have = getattr(processor, "num_query_tokens", None)
    if have is None:
        processor.num_query_tokens = want
    elif int(have) != want:
        raise PopyouError(f"captioning model {source!r}: its processor puts {have} image tokens before the text but "
                          f"the model has {want} query tokens; the processor and the model do not belong together "
                          f"(fix num_query_tokens in processor_config.json)")
    model_token = getattr(net.config, "image_token_id", None)
    if model_token is None:
        model_token = getattr(net.config, "image_token_index", None)
    processor_token = processor.tokenizer.convert_tokens_to_ids(str(processor.image_token))
    if model_token is None or int(model_token) != int(processor_token):
        raise PopyouError(f"captioning model {source!r}: the model's image token id ({model_token}) is not the "
                          f"processor's ({processor.image_token} = {processor_token}); its files predate the "
                          f"image-token format of transformers 5: fetch them again (`popyou download --stages "
                          f"caption`)")


def captioner_files(model: str) -> list[str | tuple[str, ...]]:
    """The files a BLIP-2 load reads, as far as the cache tells (the shards of a sharded checkpoint once its
    index is cached): what a "not in the cache" error names."""
    wanted: list[str | tuple[str, ...]] = [
        "config.json",
        ("processor_config.json", "preprocessor_config.json"),
        "tokenizer_config.json",
        ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin"),
    ]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = cached_json(model, index_name)
        if index is not None:
            wanted += sorted(set(index.get("weight_map", {}).values()))
            break
    return wanted


def captioner_from_config(config, processor, *, device: Any = "cpu", dtype: Any = None, seed: int = 0):
    """``(model, processor)`` like :func:`load_captioner`, with random weights built from ``config`` (a
    ``Blip2Config``): no files. Each part gets the dtype a real load gives it: ``from_pretrained`` keeps the
    class's ``_keep_in_fp32_modules`` (BLIP-2's Q-Former and query tokens) in float32 when asked for float16, and
    so does this. Built directly on ``device`` in its dtype (no float32 copy of 3.7B weights first)."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    from popyou_cli.core.devices import resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, "data")
    with torch.device(dev), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        net = Blip2ForConditionalGeneration._from_config(config, dtype=dt)
    keep_fp32_parts(net, dt)
    return _ready(net, processor, dev, "random weights")


def keep_fp32_parts(net, dtype) -> None:
    """Cast the modules a transformers class keeps in float32 under float16 (``_keep_in_fp32_modules``) back to
    float32, as ``from_pretrained`` does for a float16 load."""
    import torch

    if dtype != torch.float16:
        return
    keep = set(getattr(net, "_keep_in_fp32_modules", None) or ())
    for name, param in net.named_parameters():
        if any(part in keep for part in name.split(".")):
            param.data = param.data.float()


@functools.lru_cache(maxsize=8)
def _tiny_captioner(device: "torch.device", dtype: "torch.dtype"):
    net, processor = build_tiny_captioner()
    return net.to(device=device, dtype=dtype), processor


# A fixed little corpus for the tiny captioner's BPE tokenizer: its merges only make tokens a few letters long.
_TINY_CAPTION_CORPUS = (
    "a funko pop figure of a man with a red hat and a blue shirt",
    "a vinyl toy of a woman with long black hair holding a sword",
    "a cartoon figurine of a robot standing on a white background",
    "a photo of a small toy with big eyes, green jacket and brown boots",
    "an illustration of a cute character wearing glasses and a yellow dress",
)
_TINY_CAPTION_SPECIALS = ("<pad>", "</s>", "<unk>")


@functools.lru_cache(maxsize=None)
def _tiny_caption_tokenizer_files() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Vocabulary and merges of a tiny byte-level BPE trained on a fixed corpus (deterministic, milliseconds)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        min_frequency=2,
        special_tokens=list(_TINY_CAPTION_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_TINY_CAPTION_CORPUS), trainer=trainer)
    state = json.loads(tok.to_str())["model"]
    vocab = tuple(sorted(state["vocab"].items(), key=lambda item: item[1]))
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"])
    return vocab, merges


def build_tiny_captioner(*, seed: int = TINY_CAPTIONER_SEED):
    """Build (uncached, on CPU, float32) the tiny BLIP-2 with seeded random weights, and its processor.

    Same classes as the real one: Blip2ForConditionalGeneration with an OPT language model, a GPT2Tokenizer
    (byte-level BPE, as OPT's) and a Blip2Processor with 64-pixel images and 4 query tokens. It captions with
    gibberish, quickly.
    """
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    tokenizer = _tiny_opt_tokenizer()
    image_processor = BlipImageProcessor(
        size={"height": TINY_CAPTIONER_IMAGE_SIZE, "width": TINY_CAPTIONER_IMAGE_SIZE},
    )
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=TINY_CAPTIONER_QUERY_TOKENS)
    config = _tiny_blip2_config(tokenizer, tokenizer.convert_tokens_to_ids(str(processor.image_token)))
    with seeded(seed):
        net = Blip2ForConditionalGeneration(config)
        # With the default init (std 0.02) every image gets the same caption; with std 0.2 the image shows.
        with torch.no_grad():
            for param in net.parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, 0.2)
    _generate_word_like_captions(net, tokenizer, str(processor.image_token))
    return net.eval(), processor


def _tiny_opt_tokenizer():
    """A GPT2Tokenizer over the tiny corpus's byte-level BPE, with OPT's special tokens and habits."""
    from transformers import GPT2Tokenizer

    vocab, merges = _tiny_caption_tokenizer_files()
    return GPT2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,  # as OPT's tokenizer: "</s>" starts every text
        padding_side="left",
    )


def _tiny_blip2_config(tokenizer, image_token_id: int):
    """BLIP-2's three parts (ViT, Q-Former, OPT) at width 32, two layers each."""
    from transformers import Blip2Config

    width = 32
    return Blip2Config(
        vision_config=dict(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_CAPTIONER_IMAGE_SIZE,
            patch_size=16,
        ),
        qformer_config=dict(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            encoder_hidden_size=width,
            cross_attention_frequency=1,
        ),
        text_config=dict(
            model_type="opt",
            vocab_size=len(tokenizer),
            hidden_size=width,
            word_embed_proj_dim=width,
            ffn_dim=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        num_query_tokens=TINY_CAPTIONER_QUERY_TOKENS,
        image_token_index=image_token_id,
    )


def _generate_word_like_captions(net, tokenizer, image_token: str) -> None:
    """Keep the gibberish word-like: only generate tokens made of letters, spaces and a little punctuation (stray
    UTF-8 bytes would decode to U+FFFD), never <pad>, <unk> or <image>; at least 4 tokens."""
    import string

    allowed = set(string.ascii_letters + " ,.-'")
    suppress = sorted(
        i
        for token, i in tokenizer.get_vocab().items()
        if i != tokenizer.eos_token_id
        and (
            token in tokenizer.all_special_tokens
            or token == image_token
            or not set(tokenizer.convert_tokens_to_string([token])) <= allowed
        )
    )
    # BLIP-2's generate() hands over to its language model's generate(), which reads its own generation config
    for gen_config in {id(c): c for c in (net.generation_config, net.language_model.generation_config)}.values():
        gen_config.max_new_tokens = 20
        gen_config.min_new_tokens = 4  # random weights often pick "</s>" first: avoid empty captions
        gen_config.bos_token_id = tokenizer.bos_token_id
        gen_config.eos_token_id = tokenizer.eos_token_id
        gen_config.pad_token_id = tokenizer.pad_token_id
        gen_config.suppress_tokens = suppress
