"""The real architectures popyou ships configs for (popyou_cli/third_party/arch) and `popyou bench ... --arch full`.

Quick, run by default: the bundled configs build (on the meta device: no memory) to the published parameter
counts; a random-weight BLIP-2 gets the per-part dtypes a real float16 load gives; `bench all --arch tiny` runs
every stage's benchmark. Slow, `-m slow` only (not in the default run or CI: BLIP-2 alone needs ~15 GB of RAM
and minutes on a CPU): one batch of each stage at real size on the CPU through `popyou bench <stage> --arch full`.
"""
import json

import pytest
import torch
from helpers import invoke

from popyou_cli.third_party.arch import BLIP2_OPT, SDXL_TURBO, read_config


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_bundled_configs_build_the_published_sizes():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, CLIPTextConfig, CLIPTextModel,
                              CLIPTextModelWithProjection)

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(read_config(SDXL_TURBO / "unet" / "config.json"))
        assert _count(unet) == 2_567_463_684
        assert _count(AutoencoderKL.from_config(read_config(SDXL_TURBO / "vae" / "config.json"))) == 83_653_863
        clip_l = CLIPTextConfig.from_json_file(SDXL_TURBO / "text_encoder" / "config.json")
        clip_g = CLIPTextConfig.from_json_file(SDXL_TURBO / "text_encoder_2" / "config.json")
        assert _count(CLIPTextModel(clip_l)) == 123_060_480
        assert _count(CLIPTextModelWithProjection(clip_g)) == 694_659_840
        blip2 = Blip2ForConditionalGeneration(Blip2Config.from_json_file(BLIP2_OPT / "config.json"))
        assert round(_count(blip2) / 1e9, 2) == 3.74
    index = read_config(SDXL_TURBO / "model_index.json")
    assert {k for k, v in index.items() if isinstance(v, list) and v[0]} == {
        "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"}


def test_random_blip2_has_the_dtypes_of_a_real_fp16_load(tmp_path):
    """captioner_from_config (what the full bench builds) and from_pretrained (what caption loads) agree per
    parameter: float16, except the Q-Former and query tokens in float32."""
    from popyou_cli.third_party import build_tiny_captioner, load_captioner
    from popyou_cli.third_party.blip2 import captioner_from_config

    net, processor = build_tiny_captioner()
    net.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, _ = load_captioner(str(tmp_path), device="cpu", dtype="fp16")
    built, _ = captioner_from_config(net.config, processor, device="cpu", dtype="fp16")
    dtypes = lambda m: {name: p.dtype for name, p in m.named_parameters()}  # noqa: E731
    assert dtypes(built) == dtypes(loaded)
    assert {p.dtype for n, p in loaded.named_parameters() if n.startswith("qformer")} == {torch.float32}
    assert loaded.language_model.get_input_embeddings().weight.dtype == torch.float16


def test_full_gen_data_bench_reports_each_batch_size(monkeypatch, tmp_path):
    """The --arch full path of bench gen-data (512 px, one row per batch size) with the tiny pipeline standing
    in for SDXL-Turbo's architecture, whose CPU run is the slow test below."""
    from popyou_cli.third_party import arch
    from popyou_cli.third_party import build_tiny_text_to_image

    monkeypatch.setattr(arch, "full_text_to_image", lambda device, dtype: build_tiny_text_to_image(64))
    res = invoke("bench", "gen-data", "--arch", "full", "--device", "cpu", "--batch-sizes", "1,2", "--repeats", "1",
                 "--out", tmp_path / "out.json")
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "out.json").read_text())["results"]
    assert [(r["batch"], r["size"], r["output"]) for r in rows] == [(1, 512, [1, 512, 512, 3]), (2, 512, [2, 512, 512, 3])]


def test_bench_all_tiny_runs_every_stage(tmp_path):
    res = invoke("bench", "all", "--arch", "tiny", "--device", "cpu", "--repeats", "1", "--out-dir", tmp_path)
    assert res.exit_code == 0, res.output
    for stage in ("gen-data", "caption", "encode", "sample", "train"):
        assert json.loads((tmp_path / f"{stage}.json").read_text())["results"], stage


@pytest.mark.slow
@pytest.mark.parametrize("stage,args", [
    ("gen-data", ["--batch-sizes", "1"]),
    ("caption", ["--n", "2", "--batch-size", "2", "--max-new-tokens", "2", "--workers", "0"]),
    ("encode", ["--n", "2", "--batch-size", "2", "--workers", "0"]),
])
def test_full_size_stage_on_cpu(stage, args, tmp_path):
    """One real-size batch per stage on the CPU: `python -m pytest -m slow popyou_cli_tests/test_bench_full.py`."""
    res = invoke("bench", stage, "--arch", "full", "--device", "cpu", "--repeats", "1", *args,
                 "--out", tmp_path / "out.json")
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "out.json").read_text())["results"]
    assert rows and all(r["images_per_s"] > 0 for r in rows)
