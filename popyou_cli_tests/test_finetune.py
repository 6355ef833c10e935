"""`popyou finetune`: a new class row (null row last), the loss falls, the model folder loads in `popyou sample`,
LoRA merged or separate, and bad input stopped with one line before any training."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from popyou_cli.core.errors import PopyouError
from popyou_cli.models.checkpoints import build_tiny_var, load_var
from popyou_cli.models.lora import apply_lora, load_var_lora
from popyou_cli.train.finetune import add_class
from popyou_cli.train.loop import read_metrics
from helpers import encoded_stage, invoke

TINY = ["--preset", "tiny"]


def test_finetune_learns_new_class_and_sample_loads_it(tmp_path):
    out = tmp_path / "run"
    res = invoke("finetune", *TINY, "--data", encoded_stage(), "--out", out, "--max-steps", 30,
                 "--class-name", "funko pop", "--init-from", "mean", "--scale-weights", "2,1,1,1")
    assert res.exit_code == 0, res.output
    losses = [m["loss"] for m in read_metrics(out)]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["config"]["num_classes"] == 11 and cfg["new_class_id"] == 10 and cfg["vqvae"] == "tiny"
    assert cfg["class_names"][10] == "funko pop" and cfg["class_names"][:10] == [None] * 10
    base = build_tiny_var().class_emb.weight
    new = load_file(str(out / "model" / "model.safetensors"))["class_emb.weight"]
    assert new.shape == (12, base.shape[1])
    assert torch.equal(new[:10], base[:10])  # the original classes are untouched (no gradient, no decay)
    assert not torch.allclose(new[10], base[:10].mean(0), atol=1e-3)  # the new row left its starting point
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-10.png", "step-20.png", "step-30.png"]
    s = invoke("sample", "--var", out / "model", "--vae", "tiny", "--class-id", 10, "--n", 2, "--top-k", 8,
               "--out", tmp_path / "s", "--device", "cpu")
    assert s.exit_code == 0, s.output
    pngs = [p for p in (tmp_path / "s").glob("class10_*.png") if "grid" not in p.name]
    assert len(pngs) == 2 and np.asarray(Image.open(pngs[0])).shape == (64, 64, 3)
    assert "(funko pop)" in s.output


def test_add_class_keeps_old_rows_and_null_last():
    var = build_tiny_var()
    old = var.class_emb.weight.detach().clone()
    assert add_class(var, 3) == 10
    w = var.class_emb.weight
    assert torch.equal(w[:10], old[:10]) and torch.equal(w[10], old[3]) and torch.equal(w[11], old[10])
    assert var.num_classes == var.config.num_classes == 11
    x = torch.zeros(2, var.config.L - 1, var.config.z_channels)
    assert var.eval()(torch.tensor([10, 3]), x).shape == (2, var.config.L, 64)
    v2 = build_tiny_var()
    add_class(v2, "mean")
    assert torch.allclose(v2.class_emb.weight[10], old[:10].mean(0))


def test_lora_merged_and_separate_give_the_same_model(tmp_path):
    common = [*TINY, "--data", encoded_stage(), "--max-steps", 8, "--lora", "--n-samples", 0, "--lr", "2e-2"]
    for mode in ("merged", "separate"):
        res = invoke("finetune", *common, "--lora-save", mode, "--out", tmp_path / mode)
        assert res.exit_code == 0, res.output
    separate = tmp_path / "separate" / "model"
    assert (separate / "adapter_model.safetensors").is_file() and (separate / "adapter_config.json").is_file()
    merged, _ = load_var(str(tmp_path / "merged" / "model"))
    restored, _ = load_var_lora(str(separate))
    base_only, _ = load_var(str(separate))  # the base weights with the new row at its initial value
    x = torch.randn(2, merged.config.L - 1, merged.config.z_channels, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([10, 10])
    with torch.no_grad():
        a, b, c = merged(labels, x), restored(labels, x), base_only(labels, x)
    assert torch.allclose(a, b, atol=1e-5)
    assert (a - c).abs().max() > 1e-3  # the LoRA (and the trained class row) changed the model
    trained = load_file(str(tmp_path / "merged" / "model" / "model.safetensors"))
    start = build_tiny_var().state_dict()
    assert torch.equal(trained["blocks.0.attn.mat_qkv.weight"], start["blocks.0.attn.mat_qkv.weight"])  # no LoRA there
    assert not torch.equal(trained["blocks.0.ffn.fc1.weight"], start["blocks.0.ffn.fc1.weight"])
    # popyou sample --var merges a separate LoRA back in: the same images as the merged folder
    for mode in ("merged", "separate"):
        res = invoke("sample", "--var", tmp_path / mode / "model", "--vae", "tiny", "--class-id", 10, "--n", 2,
                     "--top-k", 4, "--out", tmp_path / f"s-{mode}")
        assert res.exit_code == 0, res.output
    for k in (0, 1):
        a = np.asarray(Image.open(tmp_path / "s-merged" / f"class10_seed{k}.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "s-separate" / f"class10_seed{k}.png")).astype(int)
        assert np.abs(a - b).max() <= 1


def test_lora_on_a_weight_used_without_its_module_is_refused():
    with pytest.raises(PopyouError, match="mat_qkv is not called as a module"):
        apply_lora(build_tiny_var(), rank=2, alpha=4, dropout=0.0, targets="mat_qkv,fc1")
    with pytest.raises(PopyouError, match="no Linear layer of this VAR is called 'nope'"):
        apply_lora(build_tiny_var(), rank=2, alpha=4, dropout=0.0, targets="nope")


@pytest.mark.parametrize("case,message", [
    ("no_codes", "column 'codes' not found in .*made by 'popyou encode' \\(needed by 'popyou finetune'\\)"),
    ("patch_nums", "codes were made for patch_nums \\(1, 2, 4\\), the VAR uses \\(1, 2, 3, 4\\)"),
    ("init_from", "--init-from 99 is out of range: this VAR has classes 0..9"),
    ("class_id", "--class-id 10 is out of range"),
    ("fp16_cpu", "fp16 needs a CUDA GPU"),
    ("all_errors", "all 4 rows have an encode_error"),
])
def test_bad_input_stops_before_training(tmp_path, case, message):
    data, extra = encoded_stage(), []
    if case == "no_codes":
        data = encoded_stage(drop=("codes", "codes_flip"))
    elif case == "patch_nums":
        data = encoded_stage(n=16, patch_nums=(1, 2, 4))
    elif case == "all_errors":
        data = encoded_stage(n=4, errors=(0, 1, 2, 3))
    extra = {"init_from": ["--init-from", 99], "class_id": ["--class-id", 10],
             "fp16_cpu": ["--dtype", "fp16"]}.get(case, [])
    if case == "fp16_cpu" and torch.cuda.is_available():
        pytest.skip("fp16 is allowed with a GPU")
    res = invoke("finetune", *TINY, "--data", data, "--out", tmp_path / "o", *extra)
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert __import__("re").search(message, " ".join(res.output.split())), res.output
    assert not (tmp_path / "o" / "checkpoints").exists() and not (tmp_path / "o" / "model").exists()


def test_rows_with_encode_errors_are_skipped_and_counted(tmp_path):
    res = invoke("finetune", *TINY, "--data", encoded_stage(errors=(0, 5, 7)), "--out", tmp_path, "--max-steps", 2,
                 "--n-samples", 0)
    assert res.exit_code == 0, res.output
    assert "skipping 3 of 192 rows with an encode_error" in " ".join(res.output.split())
    assert "on 189 rows" in " ".join(res.output.split())
