"""Every number a user types is bounded up front (bounds.py): each case the probe found is refused by the CLI with
exit status 1, one `error:` line naming the option and its accepted range, before any work. Also a checkpoint's
trainer_state.json claiming an impossible step. CPU, offline, in-process."""
import json
import shutil

import pytest

from helpers import encoded_stage, invoke, one_line_error

FT = ["finetune", "--preset", "tiny", "--sample-every", 0, "--n-samples", 0]
AD = ["train-adapter", "--preset", "tiny", "--var", "tiny", "--n-samples", 0]
SAMPLE = ["sample", "a wizard", "--pipeline", "nowhere"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # conftest.py


@pytest.mark.parametrize("args,message", [
    ([*FT, "--max-steps", 10**12], "--max-steps must be in 1..100_000_000 (got 1_000_000_000_000)"),
    ([*FT, "--epochs", "1e300"], "--epochs must be a finite number in [0, 1e+06] (got 1e+300)"),
    ([*FT, "--lora", "--lora-rank", 10**6], "--lora-rank must be in 1..4_096 (got 1_000_000)"),
    (["finetune", "--preset", "tiny", "--n-samples", 10**5], "--n-samples must be in 0..256 (got 100_000)"),
    ([*AD, "--beta", "1e308"], "--beta must be a finite number in [-100, 100] (got 1e+308)"),
    ([*AD, "--alpha", "-1e308"], "--alpha must be a finite number in [-100, 100] (got -1e+308)"),
    ([*AD, "--adapter-init-gain", "1e308"], "--adapter-init-gain must be a finite number in [0, 100]"),
    ([*SAMPLE, "--beta", "1e308"], "--beta must be a finite number in [-100, 100] (got 1e+308)"),
    ([*SAMPLE, "--alpha", "-1e308"], "--alpha must be a finite number in [-100, 100] (got -1e+308)"),
    ([*SAMPLE, "--beta-sweep", "0:1e308:3"], "--beta-sweep START and END each must be a finite number in [-100, 100]"),
    ([*SAMPLE, "--beta-sweep", "-1e308:0:3"], "--beta-sweep START and END each must be a finite number in [-100, 100]"),
    ([*SAMPLE, "--batch-size", 10**6], "--batch-size must be in 1..65_536 (got 1_000_000)"),
    ([*SAMPLE, "--seed", 2**63 - 1, "--n", 3], "--seed 9223372036854775807 with 3 images uses seeds up to"),
    ([*SAMPLE, "--n", 10**6], "--n must be in 1..100_000 (got 1_000_000)"),
    (["eval", "--pipeline", "nowhere", "--n-prompts", 10**5], "--n-prompts must be in 2..50_000 (got 100_000)"),
    (["eval", "--pipeline", "nowhere", "--seed", 2**63 - 10], "uses seeds up to"),
    (["demo", "--pipeline", "nowhere", "--port", 10**6], "--port must be in 1..65_535"),
])
def test_every_typed_number_is_refused_out_of_range_before_any_work(tmp_path, args, message):
    out = tmp_path / "out"
    if args[0] in ("finetune", "train-adapter"):
        args = [*args, "--data", encoded_stage()]
    if args[0] != "demo":
        args = [*args, "--out", out]
    line = one_line_error(invoke(*args))
    assert message in line, line
    assert not out.exists() or not [p for p in out.rglob("*") if not p.name.startswith(".")], list(out.rglob("*"))


@pytest.mark.parametrize("command", ["gen-data", "caption", "encode"])
def test_bench_counts_are_bounded(command):
    line = one_line_error(invoke("bench", command, "--n", 10**9, "--arch", "tiny"))
    assert "--n must be in 1..10_000 (got 1_000_000_000)" in line, line


@pytest.mark.parametrize("field,value", [("step", 10**15), ("step", "4"), ("micro", -1)])
def test_a_checkpoint_claiming_an_impossible_step_is_refused(tmp_path, field, value):
    data = encoded_stage()
    assert invoke(*FT, "--data", data, "--max-steps", 2, "--out", tmp_path / "ft").exit_code == 0
    ckpt = tmp_path / "ft" / "checkpoints" / "step-2"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state[field] = value
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    shutil.copytree(ckpt, tmp_path / "ckpt")
    for args in ([*FT, "--data", data, "--max-steps", 4, "--out", tmp_path / "ft"],
                 [*FT, "--data", data, "--max-steps", 4, "--resume", tmp_path / "ckpt", "--out", tmp_path / "b"]):
        line = one_line_error(invoke(*args))
        assert "trainer_state.json: '" + field + "' must be a whole number in 0.." in line, line


def test_the_python_api_checks_seeds_as_the_cli_does():
    from popyou_cli.core.errors import PopyouError
    from popyou_cli.infer.options import seed_or_random

    with pytest.raises(PopyouError, match=r"--seed 9223372036854775807 with 3 images uses seeds up to"):
        seed_or_random(2**63 - 1, 3)
    with pytest.raises(PopyouError, match=r"--seed must be in \[0, 2\^63\) \(got -1\)"):
        seed_or_random(-1)
    assert seed_or_random(7, 3) == 7 and 0 <= seed_or_random(None) < 2**31
