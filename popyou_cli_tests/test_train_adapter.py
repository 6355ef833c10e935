"""`popyou train-adapter`: the adapter learns to use the embedding (held-out loss right < shuffled), the text
stage warm-starts from the image stage, the pipeline folder loads and pushes, and bad input is stopped early."""
import json

import pytest
import torch
from safetensors.torch import load_file

from popyou_cli.infer import pipeline as P
from popyou_cli.models.adapter import AdapterConfig, CondAdapter
from popyou_cli.train.finetune import finetune
from popyou_cli.models.generate import generate
from helpers import encoded_stage, invoke

TINY = ["--preset", "tiny"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    finetune(data=encoded_stage(), out=out, preset="tiny", max_steps=40, n_samples=0)
    return out / "model"


@pytest.fixture(scope="module")
def image_stage(finetuned, tmp_path_factory):
    out = tmp_path_factory.mktemp("img")
    res = invoke("train-adapter", *TINY, "--stage", "image", "--var", finetuned, "--data", encoded_stage(),
                 "--out", out, "--lora", "--max-steps", 120, "--lr", "1e-2", "--sample-every", 60, "--beta", 1.0)
    assert res.exit_code == 0, res.output
    return out


def test_adapter_uses_the_embedding_on_held_out_rows(image_stage):
    ev = json.loads((image_stage / "eval.json").read_text())
    assert ev["rows"] == 38
    # the right embedding predicts the codes better than another row's embedding, and better than none
    assert ev["right"] < ev["shuffled"] - 0.05, ev
    assert ev["right"] < ev["class_only"] - 0.05, ev
    losses = [json.loads(ln)["loss"] for ln in (image_stage / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.1
    assert sorted(p.name for p in (image_stage / "samples").iterdir()) == ["step-120.png", "step-60.png"]


def test_pipeline_folder_loads_with_its_parts(image_stage):
    folder = image_stage / "pipeline"
    cfg = json.loads((folder / "pipeline.json").read_text())
    assert cfg["var"] == "var" and cfg["vqvae"] == "tiny"  # LoRA merged into a copy of the finetuned VAR
    assert cfg["encoder"] == {"model": "tiny", "pretrained": None, "embedding": "image", "text_field": None, "dim": 32}
    assert cfg["sampling"]["class_id"] == 10 and cfg["sampling"]["beta"] == 1.0
    pipe = P.Pipeline.from_pretrained(str(folder), device="cpu")
    assert pipe.adapter.config == AdapterConfig(embed_dim=32, var_dim=64, hidden_dim=64)
    assert pipe.var.num_classes == 11 and pipe.class_id == 10
    emb = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    delta = pipe.adapter(emb)
    assert torch.allclose(delta.norm(dim=-1), torch.ones(2), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    img = generate(pipe.var, pipe.vqvae, 2, 10, cfg=1.5, top_k=8, cond_delta=delta, generator=g)
    assert img.shape == (2, 3, 64, 64)


def test_text_stage_starts_from_image_adapter_and_pushes(image_stage, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo, **kw: calls.append(("create", repo)))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw)) or "url")
    res = invoke("train-adapter", *TINY, "--stage", "text", "--text-field", "caption", "--init",
                 image_stage / "pipeline", "--data", encoded_stage(), "--out", tmp_path, "--max-steps", 2,
                 "--lr", "1e-12", "--n-samples", 0, "--push-to-hub", "me/funko-pipeline")
    assert res.exit_code == 0, res.output
    assert calls[0] == ("create", "me/funko-pipeline")
    assert calls[1][1]["repo_id"] == "me/funko-pipeline" and calls[1][1]["folder_path"] == str(tmp_path / "pipeline")
    before = load_file(str(image_stage / "pipeline" / "adapter.safetensors"))
    after = load_file(str(tmp_path / "pipeline" / "adapter.safetensors"))
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)  # warm start (lr ~ 0)
    cfg = json.loads((tmp_path / "pipeline" / "pipeline.json").read_text())
    assert cfg["encoder"]["embedding"] == "text" and cfg["encoder"]["text_field"] == "caption"
    # recorded relative to the pipeline folder (it is uploaded as it is), pointing at the image stage
    assert (tmp_path / "pipeline" / cfg["train"]["init"]).resolve() == (image_stage / "pipeline").resolve()


@pytest.mark.parametrize("case,message", [
    ("no_embedding", "column 'siglip_image' not found in .*made by 'popyou encode' "
                     "\\(needed by 'popyou train-adapter'\\)"),
    ("width", "embedding width 16 .* do not fit the adapter from .* \\(32 -> 64\\)"),
    ("class", "--class-id 11 is out of range: this VAR has classes 0..10"),
    ("no_var", "--var is needed"),
])
def test_bad_input_stops_before_training(finetuned, tmp_path, case, message):
    data, extra = encoded_stage(), ["--var", finetuned]
    if case == "no_embedding":
        data = encoded_stage(drop=("siglip_image",))
    elif case == "width":
        init = tmp_path / "init"
        from popyou_cli.models.adapter import save_adapter

        save_adapter(CondAdapter(AdapterConfig(32, 64)), init)
        data, extra = encoded_stage(n=32, dim=16), ["--var", finetuned, "--init", init]
    elif case == "class":
        extra += ["--class-id", 11]
    elif case == "no_var":
        extra = []
    res = invoke("train-adapter", *TINY, "--data", data, "--out", tmp_path / "o", *extra)
    assert res.exit_code == 1
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1, res.output
    assert __import__("re").search(message, " ".join(res.output.split())), res.output
    assert not (tmp_path / "o" / "checkpoints").exists()
