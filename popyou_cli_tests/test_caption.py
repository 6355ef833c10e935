"""`popyou caption` on the tiny offline preset, and the image decoding it shares with encode (images.py): odd and
broken pictures, a plain imagefolder input, resume after a simulated kill, prompts and beams, bad input, the bench.
CPU only; the CLI runs in-process. The real SIGKILL and the 2-process run are in test_encode.py (whole chain)."""
import io
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from helpers import invoke as run_cli, one_line_error
from popyou_cli.third_party import load_captioner
from popyou_cli.core.images import open_rgb
from popyou_cli.data.caption import Collate, generate
from popyou_cli.store import load_stage, read_manifest

TINY = ["--preset", "tiny", "--device", "cpu", "--no-progress"]
N = 16


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


RNG = np.random.default_rng(0)
PICTURE = Image.fromarray(RNG.integers(0, 256, (48, 40, 3), dtype=np.uint8))


def odd_images() -> dict[str, bytes | None]:
    """Name -> file bytes: every kind the stages must convert, then every kind they must refuse."""
    sixteen = np.full((24, 24), 65535, np.uint16)
    sixteen[:, :12] = 32896  # 128 * 257
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black: must come out white
    return {"rgb": encoded(PICTURE), "gray": encoded(PICTURE.convert("L")), "rgba": encoded(rgba),
            "16bit": encoded(Image.fromarray(sixteen)), "cmyk": encoded(PICTURE.convert("CMYK"), "JPEG"),
            "palette": encoded(PICTURE.convert("P"), transparency=3), "1bit": encoded(PICTURE.convert("1")),
            "float": encoded(Image.fromarray(np.full((16, 16), 0.5, np.float32)), "TIFF"),
            "truncated": encoded(PICTURE)[:150], "garbage": b"this is not an image", "tiny": encoded(PICTURE.resize((4, 3))),
            "empty": None}


BAD = {"truncated": "undecodable", "garbage": "undecodable", "tiny": "under the 8 px", "empty": "no image"}


def test_open_rgb_converts_what_it_can_and_explains_the_rest():
    for name, data in odd_images().items():
        img, err = open_rgb({"bytes": data, "path": None})
        if name in BAD:
            assert img is None and BAD[name] in err and "\n" not in err, (name, err)
            continue
        assert err == "" and img.mode == "RGB", (name, err)
        px = np.asarray(img)
        if name == "rgb":
            assert np.array_equal(px, np.asarray(PICTURE))
        if name == "rgba":
            assert tuple(px[0, 0]) == (255, 255, 255) and tuple(px[5, 5]) == (255, 0, 0)
        if name == "16bit":  # scaled, not clipped to white
            assert tuple(px[0, 0]) == (128, 128, 128) and tuple(px[0, 20]) == (255, 255, 255)
        if name == "float":
            assert tuple(px[0, 0]) == (128, 128, 128)
    assert open_rgb({"bytes": None, "path": "/no/such/file.png"})[1].startswith("undecodable image")
    assert open_rgb(encoded(PICTURE))[0].size == (40, 48) and open_rgb(None)[1] == "no image in this row"


@pytest.fixture(scope="module")
def gen(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cap") / "gen"
    res = run_cli("gen-data", "--n", N, "--out", out, "--preset", "tiny", "--image-size", 32, "--shard-size", 4,
                  "--device", "cpu", "--no-progress")
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def ref(gen) -> Path:
    out = gen.parent / "ref"
    res = run_cli("caption", "--data", gen, "--out", out, "--shard-size", 4, "--batch-size", 4, "--workers", 0, *TINY)
    assert res.exit_code == 0, res.output
    assert f"captioned {N} now" in res.output and "no errors" in res.output
    return out


def test_captions_rows_and_manifest(gen, ref):
    raw = datasets.load_from_disk(str(ref))
    assert raw.column_names == ["index", "caption", "caption_error"] and raw["index"] == list(range(N))
    ds = load_stage(ref)  # joined with gen-data: images are not copied
    assert {"prompt", "image", "caption"} <= set(ds.column_names)
    assert all(ds["caption"]) and set(ds["caption_error"]) == {""}
    assert len(set(ds["caption"])) > N // 2  # the tiny captioner sees its image
    # Row alignment: row 9's stored caption is the one its own image gets alone.
    net, processor = load_captioner("tiny")
    inputs = Collate(processor, None)([(9, ds[9]["image"].convert("RGB"), "")])[3]
    import torch
    alone = generate(net, processor, inputs, max_new_tokens=8, num_beams=1, device=torch.device("cpu"),
                     dtype=torch.float32)
    assert alone == [ds[9]["caption"]]
    settings = read_manifest(ref)["settings"]
    assert settings == {"model": "tiny", "prompt": "", "max_new_tokens": 8, "num_beams": 1, "dtype": "fp32",
                        "image_column": "image"}
    assert read_manifest(ref)["stage"] == "caption"


def test_imagefolder_with_broken_and_odd_images_one_worker(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    files = {name: data for name, data in odd_images().items() if data is not None}
    for k, (name, data) in enumerate(files.items()):
        (folder / f"{k:02d}_{name}.{'jpg' if name == 'cmyk' else 'tif' if name == 'float' else 'png'}").write_bytes(data)
    plain = tmp_path / "plain"
    datasets.load_dataset("imagefolder", data_dir=str(folder), split="train",
                          cache_dir=str(tmp_path / "cache")).rename_column("image", "picture").save_to_disk(str(plain))
    res = run_cli("caption", "--data", plain, "--out", tmp_path / "cap", "--image-column", "picture", "--workers", 1,
                  "--batch-size", 4, *TINY)
    assert res.exit_code == 0, res.output
    bad = [name for name in files if name in BAD]
    assert f"{len(bad)} of {len(files)} rows have an error in caption_error" in res.output
    ds = load_stage(tmp_path / "cap")
    assert len(ds) == len(files) and ds["index"] == list(range(len(files)))  # no row dropped
    for name, caption, error in zip(files, ds["caption"], ds["caption_error"]):
        if name in BAD:
            assert caption == "" and BAD[name] in error, (name, error)
        else:
            assert caption and error == "", (name, error)


def test_resume_makes_only_missing_shards_and_equals_uninterrupted(ref, gen, tmp_path):
    out = tmp_path / "killed"
    shutil.copytree(ref, out)
    # What a SIGKILL leaves: some shards, a half-written hidden temporary, no state.json (never finalized).
    for p in [*sorted(out.glob("shard-*.arrow"))[1::2], out / "state.json", out / "dataset_info.json"]:
        p.unlink()
    (out / ".shard-00001-000000004-000000008.arrow.123.abcd.tmp").write_bytes(b"partial")
    with pytest.raises(Exception, match="unfinished"):
        load_stage(out)
    res = run_cli("caption", "--data", gen, "--out", out, "--shard-size", 4, "--batch-size", 4, "--workers", 0, *TINY)
    assert res.exit_code == 0 and f"captioned {N // 2} now" in res.output, res.output
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())  # no temporary left
    for p in ref.glob("shard-*.arrow"):
        assert (out / p.name).read_bytes() == p.read_bytes()
    res = run_cli("caption", "--data", gen, "--out", out, "--shard-size", 4, "--batch-size", 4, *TINY)
    assert res.exit_code == 0 and "nothing to do" in res.output, res.output


def test_prompt_and_beam_search(gen, ref, tmp_path):
    res = run_cli("caption", "--data", gen, "--out", tmp_path / "beam", "--num-beams", 3, "--caption-prefix", "a photo of",
                  "--max-new-tokens", 6, "--workers", 0, *TINY)
    assert res.exit_code == 0, res.output
    beams, greedy = load_stage(tmp_path / "beam")["caption"], load_stage(ref)["caption"]
    assert all(beams) and beams != greedy
    assert not any(c.startswith("a photo of") for c in beams)  # only the continuation is stored
    s = read_manifest(tmp_path / "beam")["settings"]
    assert (s["prompt"], s["num_beams"], s["max_new_tokens"]) == ("a photo of", 3, 6)


def test_bad_input_is_one_line(gen, ref, tmp_path):
    assert "column 'picture' not found" in one_line_error(
        run_cli("caption", "--data", gen, "--out", tmp_path / "a", "--image-column", "picture", *TINY))
    assert "'seed' is not an image column" in one_line_error(
        run_cli("caption", "--data", gen, "--out", tmp_path / "b", "--image-column", "seed", *TINY))
    assert "'prompt' holds text, not image files" in one_line_error(
        run_cli("caption", "--data", gen, "--out", tmp_path / "b", "--image-column", "prompt", *TINY))
    assert "overlaps input folder" in one_line_error(run_cli("caption", "--data", gen, "--out", gen, *TINY))
    assert "holds a different run" in one_line_error(
        run_cli("caption", "--data", gen, "--out", ref, "--shard-size", 4, "--num-beams", 2, *TINY))
    assert "--num-beams must be at least 1" in one_line_error(
        run_cli("caption", "--data", gen, "--out", tmp_path / "c", "--num-beams", 0, *TINY))
    assert "does not exist" in one_line_error(run_cli("caption", "--data", tmp_path / "nope", "--out", tmp_path / "d", *TINY))
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_bench_caption_tiny():
    res = run_cli("bench", "caption", "--n", 8, "--batch-size", 4, "--repeats", 1, "--workers", 0,
                  "--arch", "tiny", "--device", "cpu")
    assert res.exit_code == 0, res.output
    for mode in ("loader only", "generate only", "loader + generate", "caption stage end to end"):
        assert mode in res.output and "images/s" in res.output
    net, _ = load_captioner("tiny")  # the in-process shared stand-in keeps its own settings
    assert net.generation_config.min_new_tokens == 4 == net.language_model.generation_config.min_new_tokens


def test_progress_bar_shows_images_per_second(gen, tmp_path):
    import io as _io

    from rich.console import Console

    from popyou_cli.data.caption import caption

    buf = _io.StringIO()
    res = caption(dataset=gen, out=tmp_path / "bar", preset="tiny", device="cpu", workers=0, shard_size=8,
                  console=Console(file=buf, force_terminal=True, width=120))
    assert res.done == N and res.errors == 0 and res.world_size == 1
    assert "caption" in buf.getvalue() and "images/s" in buf.getvalue() and "ETA" in buf.getvalue()
