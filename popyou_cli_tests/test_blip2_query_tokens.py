"""BLIP-2 must see the picture: a processor without num_query_tokens (older processor files) puts no image
placeholders in front of the text under transformers 5, and every caption is then the same text-only guess.
load_captioner fills it in from the model, and refuses a processor that disagrees with the model."""
import json

import numpy as np
import pytest
from PIL import Image

from popyou_cli.third_party import build_tiny_captioner, load_captioner
from popyou_cli.core.errors import PopyouError
from popyou_cli.data import caption as C


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny BLIP-2 saved as a Hub repo would hold it, its processor file without num_query_tokens."""
    folder = tmp_path_factory.mktemp("blip2")
    net, processor = build_tiny_captioner()
    net.save_pretrained(folder)
    processor.save_pretrained(folder)
    cfg = json.loads((folder / "processor_config.json").read_text())
    assert cfg.pop("num_query_tokens") == 4
    (folder / "processor_config.json").write_text(json.dumps(cfg))
    return folder


def _pictures():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    red = Image.new("RGB", (64, 64), (220, 30, 30))
    return [noise, red]


def _captions(net, processor):
    _, _, _, inputs = C.Collate(processor, None)([(k, img, None) for k, img in enumerate(_pictures())])
    return C.generate(net, processor, inputs, max_new_tokens=8, num_beams=1, device="cpu", dtype=net.dtype)


def test_missing_num_query_tokens_is_filled_and_the_caption_depends_on_the_image(saved):
    net, processor = load_captioner(str(saved), device="cpu")
    assert processor.num_query_tokens == net.config.num_query_tokens == 4
    noise, red = _captions(net, processor)
    assert noise != red

    processor.num_query_tokens = None  # what the processor file alone gives: the images are ignored
    blind_noise, blind_red = _captions(net, processor)
    assert blind_noise == blind_red


def test_a_processor_that_disagrees_with_the_model_is_an_error(saved, tmp_path):
    import shutil

    folder = tmp_path / "blip2"
    shutil.copytree(saved, folder)
    cfg = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps({**cfg, "num_query_tokens": 3}))
    with pytest.raises(PopyouError, match="3 image tokens before the text but the model has 4 query tokens"):
        load_captioner(str(folder), device="cpu")
