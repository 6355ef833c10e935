"""The training loop (popyou_cli/training.py): schedule, decay groups, data order, NaN stop, kill + resume,
two processes under torchrun, `bench train`. Also home of `encoded_stage`, the synthetic encode folder that
test_finetune.py and test_train_adapter.py import."""
import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import invoke  # noqa: F401 - test_finetune and test_train_adapter import it from here
from popyou_cli.errors import PopyouError
from popyou_cli.models.checkpoints import build_tiny_var, load_vqvae
from popyou_cli.store import StageWriter
from popyou_cli.training import (TrainConfig, batch_rows, lr_factor, make_accelerator, param_groups, read_metrics,
                                 train)

ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def encoded_stage(n=192, concepts=8, variants=4, dim=32, errors=(), drop=(), patch_nums=(1, 2, 3, 4)) -> Path:
    """An `encode` folder as the data contract describes, built once per test process. Images: `concepts`
    smooth random pictures, each in `variants` shifted versions, encoded by the tiny VQ-VAE (codes_flip from the
    mirrored image). Embeddings: a unit vector per concept plus noise (text ones rotated), so the embedding
    tells which concept a row's codes come from: a working adapter must beat shuffled embeddings."""
    root = Path(tempfile.mkdtemp(prefix="popyou-test-enc-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    vae = load_vqvae("tiny", patch_nums=patch_nums)
    g = torch.Generator().manual_seed(0)
    base = F.interpolate(torch.rand(concepts, 3, 4, 4, generator=g) * 2 - 1, size=(64, 64), mode="bicubic")
    imgs = torch.stack([torch.roll(base[k], 4 * v, dims=2) for k in range(concepts) for v in range(variants)])
    imgs = imgs.clamp(-1, 1)
    codes, flipped = (torch.cat(vae.encode_codes(x), 1).to(torch.int16) for x in (imgs, imgs.flip(-1)))
    k = torch.arange(n) % concepts
    u = k * variants + torch.randint(variants, (n,), generator=g)
    E = F.normalize(torch.randn(concepts, dim, generator=g), dim=-1)
    R = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]

    def emb(M):
        return F.normalize(M[k] + 0.3 * torch.randn(n, dim, generator=g) / dim**0.5, dim=-1).half().numpy()

    cols = {"codes": codes[u].numpy(), "codes_flip": flipped[u].numpy(), "siglip_image": emb(E),
            "siglip_text_prompt": emb(E @ R), "siglip_text_caption": emb(E @ R.T),
            "encode_error": ["unreadable image" if i in errors else "" for i in range(n)]}
    for c in drop:
        del cols[c]
    L = codes.shape[1]
    feats = datasets.Features({c: datasets.Value("string") if c == "encode_error" else
                               datasets.Sequence(datasets.Value("int16" if c.startswith("codes") else "float16"),
                                                 length=L if c.startswith("codes") else dim) for c in cols})
    w = StageWriter(root / "enc", stage="encode", parent=None, features=feats, n_rows=n, shard_size=64,
                    settings={"patch_nums": list(patch_nums), "vqvae": "tiny", "siglip_model": "tiny",
                              "siglip_pretrained": None, "siglip_dim": dim})
    for spec in w.pending_shards():
        w.write_shard(spec, {c: v[spec.start:spec.stop] for c, v in cols.items()})
    w.finalize()
    return root / "enc"


def test_lr_schedule_warmup_then_decay():
    cfg = TrainConfig(warmup=0.1, schedule="linear", max_steps=100)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # 10 warm-up steps up to the peak
    assert all(a > b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(1 / 90)
    cos = TrainConfig(warmup=5, schedule="cosine", min_lr_ratio=0.1)
    c = [lr_factor(s, 50, cos) for s in range(50)]
    assert c[4] == 1.0 and c[5] == pytest.approx(1.0) and 0.1 < c[-1] < 0.11 and c[27] == pytest.approx(0.55, abs=0.02)


def test_no_weight_decay_groups_follow_var():
    var = build_tiny_var()
    decay, no_decay = param_groups(var, 0.05)
    names = {id(p): n for n, p in var.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"pos_1LC", "pos_start", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11", "head.bias",
            "blocks.0.attn.q_bias", "class_emb.weight"} <= nd  # class rows: see param_groups
    assert {"word_embed.weight", "blocks.0.attn.mat_qkv.weight", "head.weight", "blocks.0.ffn.fc1.weight"} <= d
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_data_order_epochs_and_ranks():
    cfg = TrainConfig(batch_size=3, seed=5)
    epoch0 = torch.cat([batch_rows(m, 20, 3, cfg, r, 2) for m in range(3) for r in (0, 1)])
    assert len(set(epoch0.tolist())) == 18  # an epoch never repeats a row (the short tail is dropped)
    assert not torch.equal(batch_rows(0, 20, 3, cfg, 0, 2), batch_rows(3, 20, 3, cfg, 0, 2))  # new epoch order
    two = torch.cat([batch_rows(4, 20, 3, cfg, r, 2) for r in (0, 1)])
    assert torch.equal(two, batch_rows(4, 20, 3, TrainConfig(batch_size=6, seed=5), 0, 1))  # 2 x 3 == 1 x 6


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = torch.nn.Linear(4, 1)
    rows = {"x": torch.randn(16, 4)}
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=10, save_every=2, keep_last=5, log_every=1)

    def loss_fn(m, batch):
        loss = m(batch["x"]).pow(2).mean()
        return loss * float("nan") if len(read_metrics(tmp_path)) >= 3 else loss

    with pytest.raises(PopyouError, match=r"loss became nan at step 4.*step-2"):
        train(model, rows, loss_fn, cfg, tmp_path, accelerator=make_accelerator(cfg, tmp_path))
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-2"]
    assert len(read_metrics(tmp_path)) == 3 and torch.isfinite(model.weight).all()


class Killed(Exception):
    pass


def test_killed_run_resumes_on_the_same_curve(tmp_path):
    from popyou_cli.stages.finetune import finetune

    data = encoded_stage()
    args = ["finetune", "--preset", "tiny", "--data", data, "--max-steps", 12, "--save-every", 4, "--keep-last", 2,
            "--sample-every", 0, "--n-samples", 0, "--batch-size", 4]
    res = invoke(*args, "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output

    def kill(step, loss):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):  # killed after step 7: the last checkpoint is step-4
        finetune(data=data, out=tmp_path / "b", preset="tiny", max_steps=12, save_every=4, keep_last=2,
                 sample_every=0, n_samples=0, batch_size=4, on_step=kill)
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step-4"]
    again = invoke(*args, "--out", tmp_path / "b")  # a rerun without --resume must not silently restart
    assert again.exit_code == 1 and "--resume latest" in again.output
    other = invoke(*args[:-2], "--batch-size", 8, "--out", tmp_path / "b", "--resume", "latest")
    assert other.exit_code == 1 and "batch_size=4" in other.output
    res = invoke(*args, "--out", tmp_path / "b", "--resume", "latest")
    assert res.exit_code == 0, res.output

    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in b] == list(range(1, 13))
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], abs=1e-6)
    assert a[0]["loss"] > a[-1]["loss"] + 0.3  # the loss falls
    wa, wb = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in "ab")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-12", "step-8"]


def test_two_processes_under_torchrun_match_one_process(tmp_path):
    """DDP over gloo: 2 processes x batch 4 must follow the curve of 1 process x batch 8 (same rows per step)."""
    data = encoded_stage()
    common = ["finetune", "--preset", "tiny", "--data", data, "--max-steps", 6, "--cond-drop", 0, "--no-hflip",
              "--sample-every", 0, "--n-samples", 0, "--save-every", 3]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "popyou_cli",
           *map(str, common), "--batch-size", "4", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 process(es)" in proc.stderr
    rngs = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints" / "step-6").glob("rng-*.pt"))
    assert rngs == ["rng-0.pt", "rng-1.pt"]  # one RNG state per process
    res = invoke(*common, "--batch-size", 8, "--out", tmp_path / "one")
    assert res.exit_code == 0, res.output
    two, one = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "one")
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], abs=1e-5)
    w2, w1 = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in ("ddp", "one"))
    assert all(torch.allclose(w2[k], w1[k], atol=1e-5) for k in w1)


def test_bench_train_stored_codes_beat_reencoding(tmp_path):
    res = invoke("bench", "train", "--tiny", "--steps", 6, "--warmup", 2, "--batch-size", 8, "--device", "cpu",
                 "--out", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "b.json").read_text())
    modes = {r["mode"]: r["tokens_per_s"] for r in out["results"]}
    assert modes["stored codes"] > 0 and out["speedup"] >= 1.5, out


def test_tracker_choice_is_checked_before_training(tmp_path):
    res = invoke("finetune", "--preset", "tiny", "--data", encoded_stage(), "--out", tmp_path, "--report-to", "nope")
    assert res.exit_code == 1 and "--report-to must be" in res.output
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        res = invoke("finetune", "--preset", "tiny", "--data", encoded_stage(), "--out", tmp_path,
                     "--report-to", "tensorboard")
        assert res.exit_code == 1 and "pip install tensorboard" in res.output
        assert not (tmp_path / "checkpoints").exists()
