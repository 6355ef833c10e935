"""Pictures with words: grid.png labels each image with its prompt and seed; a beta sweep's strip stays one row."""
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import invoke
from popyou_cli.core.images import grid, image_label
from popyou_cli.infer.video import labelled_strip

TILE = 64
PAD = 2  # grid's default gap


def _tiles(n: int, value: int = 128) -> torch.Tensor:
    return torch.full((n, TILE, TILE, 3), value, dtype=torch.uint8)


def test_grid_has_a_label_band_under_each_tile():
    labels = [image_label("a wizard funko pop with a very long description that cannot fit", 7),
              image_label("a knight", 8), image_label("a robot", 9, beta=1.5), image_label("a cat", 10)]
    plain = grid(_tiles(4), ncol=2).numpy()
    out = grid(_tiles(4), ncol=2, labels=labels).numpy()
    assert plain.shape == (2 * (TILE + PAD) + PAD, 2 * (TILE + PAD) + PAD, 3)  # no labels: as before
    assert out.shape[1] == plain.shape[1] and out.shape[0] > plain.shape[0]  # taller: a band per row of tiles
    band_h = (out.shape[0] - PAD) // 2 - PAD - TILE
    for r in range(2):
        for c in range(2):
            top, left = PAD + r * (TILE + PAD + band_h), PAD + c * (TILE + PAD)
            assert (out[top:top + TILE, left:left + TILE] == 128).all()  # the image itself is untouched
            band = out[top + TILE:top + TILE + band_h, left:left + TILE]
            assert (band < 200).any(), f"no ink in the label band of tile {r},{c}"  # white band, dark text
            assert (out[top + TILE:top + TILE + band_h, left + TILE:left + TILE + PAD] == 255).all()  # stays in its tile


def test_image_label_says_prompt_seed_and_beta():
    assert image_label("a wizard", 3) == "a wizard\nseed 3"
    assert image_label("a wizard", 3, beta=1.25) == "a wizard\nseed 3, beta 1.25"
    assert image_label(None, 5) == "seed 5"
    with pytest.raises(ValueError, match="labels"):
        grid(_tiles(2), labels=["only one"])


def test_an_eleven_frame_strip_is_one_row():
    frames = [Image.new("RGB", (TILE, TILE), (20 * i, 90, 90)) for i in range(11)]
    strip = labelled_strip(frames, [f"beta {0.25 * i:.2f}" for i in range(11)])
    assert strip.size == (11 * TILE + 10 * 2, TILE)  # 11 tiles wide, one tile high: not 10 + 1
    twenty = labelled_strip(frames + frames[:9], ["b"] * 20)
    assert twenty.size == (10 * TILE + 9 * 2, 2 * TILE + 2)  # longer sweeps: rows of equal length (10 + 10)


@pytest.fixture(scope="module")
def pipe(quickstart):
    work, proc = quickstart
    assert proc.returncode == 0, proc.stderr[-2000:]
    return work / "txt" / "pipeline"


def test_sample_grid_is_labelled_and_blank_prompt_lines_are_skipped(pipe, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a wizard funko pop\n\na knight funko pop\n", encoding="utf-8")
    out = tmp_path / "out"
    res = invoke("sample", "--prompt-file", prompts, "--pipeline", pipe, "--n", 2, "--out", out)
    assert res.exit_code == 0, res.output
    assert "skipped 1 blank line(s)" in res.output
    assert len(list(out.glob("p*_seed*.png"))) == 4  # 2 prompts x 2 seeds: the blank line is no prompt
    g = np.asarray(Image.open(out / "grid.png"))
    assert g.shape[1] == 2 * (TILE + PAD) + PAD and g.shape[0] > 2 * (TILE + PAD) + PAD  # 2 x 2 tiles and labels
    band = g[PAD + TILE:(g.shape[0] - PAD) // 2, PAD:PAD + TILE]
    assert band.size and (band < 200).any()  # the first tile's label is written under it
