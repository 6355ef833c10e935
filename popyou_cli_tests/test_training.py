"""The training loop (popyou_cli/train/loop.py): schedule, decay groups, data order, NaN stop, kill + resume,
two processes under torchrun, `bench train`, and the options of the training presets."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import encoded_stage, invoke, one_line_error
from popyou_cli.train.conditioning import ConditionedVAR, teacher_forcing
from popyou_cli.core.errors import PopyouError
from popyou_cli.models.checkpoints import build_tiny_var
from popyou_cli.core.presets import TrainPreset
from popyou_cli.train.loop import batch_rows, lr_factor, make_accelerator, param_groups, read_metrics, train

ROOT = Path(__file__).resolve().parent.parent


def test_lr_schedule_warmup_then_decay():
    cfg = TrainPreset(warmup=0.1, schedule="linear", max_steps=100)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # 10 warm-up steps up to the peak
    assert all(a > b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(1 / 90)
    cos = TrainPreset(warmup=5, schedule="cosine", min_lr_ratio=0.1)
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
    cfg = TrainPreset(batch_size=3, seed=5)
    epoch0 = torch.cat([batch_rows(m, 20, 3, cfg, r, 2) for m in range(3) for r in (0, 1)])
    assert len(set(epoch0.tolist())) == 18  # an epoch never repeats a row (the short tail is dropped)
    assert not torch.equal(batch_rows(0, 20, 3, cfg, 0, 2), batch_rows(3, 20, 3, cfg, 0, 2))  # new epoch order
    two = torch.cat([batch_rows(4, 20, 3, cfg, r, 2) for r in (0, 1)])
    assert torch.equal(two, batch_rows(4, 20, 3, TrainPreset(batch_size=6, seed=5), 0, 1))  # 2 x 3 == 1 x 6


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = torch.nn.Linear(4, 1)
    rows = {"x": torch.randn(16, 4)}
    cfg = TrainPreset(lr=1e-2, batch_size=4, max_steps=10, save_every=2, keep_last=5, log_every=1)

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
    from popyou_cli.train.finetune import finetune

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
    # --resume auto (the default) never continues another run's checkpoints: it names what differs
    other = one_line_error(invoke(*args[:-2], "--batch-size", 8, "--out", tmp_path / "b"))
    assert "holds checkpoints of another run" in other and "batch_size 8 (checkpoint: 4)" in other
    other = one_line_error(invoke(*args[:-2], "--batch-size", 8, "--out", tmp_path / "b", "--resume", "latest"))
    assert "cannot resume from" in other and "--resume-with-changes" in other
    res = invoke(*args, "--out", tmp_path / "b")  # the same command again, no flag: it continues the run
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


def test_a_refusal_on_the_main_process_reaches_every_process(tmp_path):
    """Only the main process takes the run folder's lock; its refusal (core/processes.on_main_process) must stop
    the other process too, with the same line, instead of leaving it waiting at the next barrier."""
    from popyou_cli.core.locks import FolderLock

    out = tmp_path / "held"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "popyou_cli", "finetune", "--preset", "tiny",
           "--data", str(encoded_stage()), "--max-steps", "2", "--out", str(out)]
    with FolderLock(out, "run folder", "popyou test"):  # held by this process: both ranks are other processes
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode != 0
    refusals = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: run folder") and "is in use by" in ln]
    assert len(refusals) == 2 and "(popyou test)" in refusals[0], proc.stderr[-3000:]


def test_bench_train_reports_both_modes(tmp_path):
    res = invoke("bench", "train", "--arch", "tiny", "--steps", 6, "--warmup", 2, "--batch-size", 8, "--device", "cpu",
                 "--out", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "b.json").read_text())
    modes = {r["mode"]: r["tokens_per_s"] for r in out["results"]}
    # Speed itself is for BENCHMARKS.md, not a test: both modes ran the same steps and the report is complete.
    assert modes["stored codes"] > 0 and modes["re-encode"] > 0 and out["speedup"] > 0, out


def test_tracker_choice_is_checked_before_training(tmp_path):
    res = invoke("finetune", "--preset", "tiny", "--data", encoded_stage(), "--out", tmp_path, "--report-to", "nope")
    assert res.exit_code == 1 and "--report-to must be" in res.output
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        res = invoke("finetune", "--preset", "tiny", "--data", encoded_stage(), "--out", tmp_path,
                     "--report-to", "tensorboard")
        assert res.exit_code == 1 and "pip install tensorboard" in res.output
        assert not (tmp_path / "checkpoints").exists()


def _conditioned(drop_rate: float):
    """A ConditionedVAR over the tiny VAR with an adapter, and a batch of 6 rows of stored codes."""
    from popyou_cli.models.adapter import AdapterConfig, CondAdapter
    from popyou_cli.models.checkpoints import load_vqvae

    var = build_tiny_var()
    var.config.cond_drop_rate = drop_rate
    vae = load_vqvae("tiny")
    codes = torch.randint(0, var.config.vocab_size, (6, var.config.L), generator=torch.Generator().manual_seed(0))
    emb = torch.nn.functional.normalize(torch.randn(6, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    model = ConditionedVAR(var, vae.quantize, 3, hflip=False, adapter=CondAdapter(AdapterConfig(32, 64)),
                           column="emb", beta=2.0)
    return model, {"codes": codes, "emb": emb}


def test_condition_dropout_happens_in_training_mode_only():
    model, batch = _conditioned(drop_rate=1.0)  # every row dropped, whenever dropout is on
    var = model.var
    with torch.no_grad():
        conditioned, _ = model.eval()(batch)
        class_only, _ = model.eval()(batch, use_delta=False)
        torch.manual_seed(0)
        trained, _ = model.train()(batch)
        # the independent truth: VAR itself, in eval mode, asked for the null class and no delta
        x_in, _ = teacher_forcing(model.quantizer, batch, model.patch_nums, hflip=False, training=False)
        null = var.eval()(torch.full((6,), var.num_classes), x_in)
    assert torch.allclose(trained, null, atol=1e-5)  # training mode: null class, and the delta is gone too
    assert not torch.allclose(conditioned, null, atol=1e-3)  # eval mode: the condition is kept
    assert not torch.allclose(conditioned, class_only, atol=1e-3)  # ... including the adapter's delta

    model, batch = _conditioned(drop_rate=0.5)
    with torch.no_grad():
        kept, _ = model.eval()(batch)
        torch.manual_seed(1)  # a seed whose draws drop some of the 6 rows, not all or none
        mixed, _ = model.train()(batch)
    same = [torch.allclose(mixed[i], kept[i], atol=1e-5) for i in range(6)]
    assert 0 < sum(same) < 6, same  # some rows dropped, some kept


def test_every_training_option_has_a_flag_and_reaches_the_preset(tmp_path):
    """A TrainPreset field is a training option: it must be settable from the CLI (cli.py passes every command
    parameter named like a field), so adding an option is one field plus one flag."""
    from dataclasses import fields

    import typer.main

    from popyou_cli.cli.app import app

    commands = {c.name: c for c in typer.main.get_command(app).commands.values()}
    params = {p.name for name in ("finetune", "train-adapter") for p in commands[name].params}
    no_flag = {"betas"}  # VAR's AdamW betas: fixed by the recipe
    param_of = {"mixed_precision": "dtype"}  # --dtype, the one spelling of precision in every command
    missing = [f.name for f in fields(TrainPreset)
               if param_of.get(f.name, f.name) not in params and f.name not in no_flag]
    assert not missing, missing
    # and flags really land in the run: in the checkpoints kept, and in the settings saved with the model
    res = invoke("finetune", "--preset", "tiny", "--data", encoded_stage(), "--out", tmp_path, "--max-steps", 3,
                 "--n-samples", 0, "--save-every", 1, "--keep-last", 1, "--seed", 5, "--no-hflip", "--lora",
                 "--lora-rank", 2, "--scale-weights", "1,1,1,2")
    assert res.exit_code == 0, res.output
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-3"]
    saved = json.loads((tmp_path / "model" / "config.json").read_text())["finetune"]["settings"]
    assert (saved["seed"], saved["hflip"], saved["lora"], saved["lora_rank"], saved["scale_weights"]) == \
        (5, False, True, 2, [1.0, 1.0, 1.0, 2.0])
    assert saved["lr"] == 3e-3  # left out: the tiny preset's
