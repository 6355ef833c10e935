"""The command line as a practitioner meets it (issue 14): truthful --help, progress in log files, one spelling
per concept with the old ones deprecated, run folders where model folders are meant, model cards and Hub pushes."""
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import encoded_stage, invoke, one_line_error
from popyou_cli.cli.app import app

README = Path(__file__).resolve().parent.parent / "README.md"
COMMANDS = ("download", "gen-data", "caption", "encode", "finetune", "train-adapter", "import", "sample", "demo", "eval",
            "materialize")
TINY_FT = ["--preset", "tiny", "--max-steps", 2, "--n-samples", 0]


def _help(*command: str) -> str:
    res = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "220"})
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())  # words as written, whatever the line breaks


# ------------------------------------------------------------------------------------------ 1. --help
def test_help_shows_defaults_and_values_as_written():
    ft, ta, sample = _help("finetune"), _help("train-adapter"), _help("sample")
    # Text in square brackets used to vanish (rich markup) and ":end:" became an emoji.
    assert "[preset: finetune 30000, adapter 20000]" in ft and "[preset: full 8]" in ft
    assert "[preset: finetune 3e-4, adapter 1e-4]" in ta and "[preset: full 0.02]" in ta
    assert "START:END:N" in sample and "🔚" not in sample
    assert "[default: 4]" in sample and "[default: full]" in ft
    for text in (ft, ta):  # training options in panels
        for panel in ("Data", "Model", "Optimisation", "LoRA", "Checkpoints", "Logging"):
            assert f"╭─ {panel}" in text, panel
    for command in COMMANDS:
        assert "🔚" not in _help(command)


@pytest.mark.parametrize("command, flag, values", [
    ("gen-data", "--preset", "full|tiny"), ("gen-data", "--dtype", "auto|fp32|bf16|fp16"),
    ("gen-data", "--format", "png|jpeg|webp"), ("encode", "--embed-dtype", "fp16|fp32"),
    ("finetune", "--schedule", "linear|cosine|constant"), ("finetune", "--report-to", "none|tensorboard|wandb"),
    ("finetune", "--lora-save", "merged|separate"), ("finetune", "--dtype", "auto|fp32|bf16|fp16"),
    ("train-adapter", "--stage", "image|text"), ("train-adapter", "--text-field", "prompt|caption"),
    ("sample", "--dtype", "auto|fp32|bf16|fp16"), ("download", "--preset", "full|tiny")])
def test_fixed_value_sets_are_listed_and_completed(command, flag, values):
    import typer.main

    assert re.search(re.escape(flag) + r"\s+" + re.escape(values), _help(command)), (flag, values)
    click_command = typer.main.get_command(app).commands[command]
    param = next(p for p in click_command.params if flag in p.opts)
    ctx = click_command.make_context(command, [], resilient_parsing=True)
    choices = values.split("|")
    assert [c.value for c in param.shell_complete(ctx, "")] == choices
    assert [c.value for c in param.shell_complete(ctx, choices[-1][:2])] == [c for c in choices
                                                                            if c.startswith(choices[-1][:2])]


def test_dtype_spellings_agree_with_devices():
    import torch

    from popyou_cli.core import devices
    from popyou_cli.core.presets import DTYPE_ALIASES, DTYPES, FINETUNE_PRESETS, PRESET_NAMES

    assert set(PRESET_NAMES) == set(FINETUNE_PRESETS) and DTYPES[0] == "auto"
    for short in DTYPES[1:]:  # what --help lists, devices parses
        assert devices.dtype_name(devices.parse_dtype(short)) == short
    for alias, short in DTYPE_ALIASES.items():
        assert devices.parse_dtype(alias) == devices.parse_dtype(short) != torch.float64


def test_errors_keep_their_text(tmp_path):
    # The sweep is checked before any model loads; its message used to read "START🔚N".
    msg = one_line_error(invoke("sample", "a wizard funko pop", "--beta-sweep", "1:2", "--out", tmp_path))
    assert "--beta-sweep takes START:END:N, e.g. 0:2.5:11 (got '1:2')" in msg


# ------------------------------------------------------------------------------------------ 2. progress
def test_progress_lines_when_stderr_is_not_a_terminal():
    import io

    from rich.console import Console

    from popyou_cli.core.progress import Progress

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=200)
    assert not console.is_terminal
    with Progress("gen-data", 10, console=console, unit="images", every=0) as progress:
        for _ in range(5):
            progress.advance(2)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 5  # one per update at every=0, and no repeat of the last one at the end
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert re.fullmatch(stamp + r" gen-data 10/10 images \(100\.0%\), [\d.,]+ images/s, elapsed \d+s, ETA 0s",
                        lines[-1]), lines[-1]
    assert re.match(stamp + r" gen-data 2/10 images \(20\.0%\), .* ETA ", lines[0]), lines[0]
    buf.truncate(0)
    with Progress("x", 10, console=console, every=3600) as progress:
        progress.advance(3)
        progress.update(4, log=True, loss=1.5)
    assert [ln.split(" ", 2)[2] for ln in buf.getvalue().splitlines()][0].startswith("x 4/10 images")


def test_every_long_command_reports_progress_in_a_log(tmp_path, monkeypatch):
    monkeypatch.setenv("POPYOU_PROGRESS_EVERY", "0")
    res = invoke("gen-data", "--preset", "tiny", "--n", 6, "--shard-size", 2, "--batch-size", 2, "--image-size", 32,
                 "--device", "cpu", "--out", tmp_path / "gen")
    assert res.exit_code == 0, res.output
    assert re.search(r"gen-data 6/6 images \(100\.0%\), .*ETA", res.output), res.output
    res = invoke("finetune", *TINY_FT, "--data", encoded_stage(), "--out", tmp_path / "ft", "--progress-every", 0)
    assert res.exit_code == 0, res.output
    assert re.search(r"finetune 2/2 steps .*ETA 0s, loss [\d.]+, lr ", res.output), res.output
    res = invoke("sample", "--var", "tiny", "--vae", "tiny", "--class-id", 1, "--n", 3, "--batch-size", 2,
                 "--device", "cpu", "--out", tmp_path / "s")
    assert res.exit_code == 0, res.output
    assert "sample 2/3 images" in res.output and "sample 3/3 images" in res.output
    monkeypatch.setenv("POPYOU_PROGRESS_EVERY", "soon")
    assert "POPYOU_PROGRESS_EVERY" in one_line_error(invoke("sample", "--var", "tiny", "--vae", "tiny", "--class-id",
                                                            1, "--n", 1, "--out", tmp_path / "s2"))


# ------------------------------------------------------------------------------------------ 3. spellings
def test_readme_spelling_table_matches_the_help():
    text = README.read_text()
    table = text[text.index("### One spelling per concept"):]
    table = table[:table.index("\n\n", table.index("|---"))]
    rows = [r for r in table.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert len(rows) >= 7
    helps = {c: _help(c) for c in COMMANDS}
    for row in rows:
        spelling = row.split("|")[2]
        for flag in re.findall(r"--[a-z][a-z-]*", spelling):
            assert any(flag in h for h in helps.values()), flag


def test_old_spellings_work_with_a_warning(tmp_path):
    res = invoke("gen-data", "--preset", "tiny", "--n", 2, "--shard-size", 2, "--batch-size", 2, "--size", 32,
                 "--device", "cpu", "--dtype", "float32", "--workers", 0, "--out", tmp_path / "gen")
    assert res.exit_code == 0, res.output
    assert "warning: --size is deprecated" in res.output and "use --image-size" in res.output
    from popyou_cli.store import read_manifest

    settings = read_manifest(tmp_path / "gen")["settings"]
    assert settings["size"] == 32 and settings["dtype"] == "fp32"  # float32 is another spelling of fp32
    res = invoke("caption", tmp_path / "gen", "--preset", "tiny", "--workers", 0, "--prompt", "a photo of",
                 "--out", tmp_path / "cap")
    assert res.exit_code == 0, res.output
    assert "positional) is deprecated" in res.output and "caption --prompt is deprecated" in res.output
    res = invoke("encode", "--data", tmp_path / "cap", "--preset", "tiny", "--workers", 0, "--flip", "--vqvae", "tiny",
                 "--embed-dtype", "float32", "--out", tmp_path / "enc")
    assert res.exit_code == 0, res.output
    assert "encode --flip is deprecated" in res.output and "encode --vqvae is deprecated" in res.output
    import datasets

    enc = datasets.load_from_disk(str(tmp_path / "enc"))
    assert "codes_flip" in enc.column_names and enc.features["siglip_image"].feature.dtype == "float32"
    res = invoke("finetune", *TINY_FT, "--data", tmp_path / "enc", "--batch-size", 1, "--mixed-precision", "no",
                 "--out", tmp_path / "ft")
    assert res.exit_code == 0 and "--mixed-precision is deprecated" in res.output, res.output
    both = invoke("encode", "--data", tmp_path / "cap", "--vae", "tiny", "--vqvae", "tiny", "--out", tmp_path / "x")
    assert "give --vae only" in one_line_error(both)


def test_a_prompt_given_as_a_prompt_file_is_one_clear_line(tmp_path):
    msg = one_line_error(invoke("sample", "--prompt-file", "a wizard funko pop", "--out", tmp_path))
    assert "one prompt per line" in msg and 'popyou sample "a wizard funko pop"' in msg
    msg = one_line_error(invoke("sample", "--prompts", "a wizard funko pop", "--out", tmp_path))  # the old name
    assert msg.startswith("error: --prompts takes a text file") and "popyou sample" in msg
    msg = one_line_error(invoke("eval", "--pipeline", "x", "--prompt-file", "a knight", "--out", tmp_path))
    assert "one prompt per line" in msg


def test_workers_zero_means_the_main_process_in_gen_data(tmp_path, monkeypatch):
    import concurrent.futures

    started = []
    real = concurrent.futures.ThreadPoolExecutor.__init__

    def spy(self, max_workers=None, thread_name_prefix="", *a, **kw):
        started.append(thread_name_prefix)
        real(self, max_workers, thread_name_prefix, *a, **kw)

    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "__init__", spy)
    res = invoke("gen-data", "--preset", "tiny", "--n", 2, "--shard-size", 2, "--batch-size", 2, "--image-size", 32,
                 "--device", "cpu", "--workers", 0, "--out", tmp_path / "gen")
    assert res.exit_code == 0, res.output
    assert "popyou-encode" not in started and "popyou-write" in started  # no encoding threads: the caller encodes
    assert "--workers must be >= 0" in one_line_error(invoke("gen-data", "--preset", "tiny", "--n", 2, "--workers",
                                                             -1, "--out", tmp_path / "g2"))


# ------------------------------------------------------------------------------------------ 5. folders
@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    res = invoke("finetune", *TINY_FT, "--data", encoded_stage(), "--out", out)
    assert res.exit_code == 0, res.output
    return out


def test_run_folders_given_for_model_folders_name_the_right_path(finetuned, tmp_path):
    msg = one_line_error(invoke("sample", "--var", finetuned, "--class-id", 10, "--out", tmp_path / "s"))
    assert f"its model is {finetuned / 'model'}" in msg
    msg = one_line_error(invoke("sample", "x", "--pipeline", finetuned, "--out", tmp_path / "s"))
    assert f"--var {finetuned / 'model'}" in msg
    # the model folder records its VQ-VAE ("tiny"): no --vae, nothing downloaded (the tests run offline)
    res = invoke("sample", "--var", finetuned / "model", "--class-id", 10, "--n", 1, "--device", "cpu",
                 "--out", tmp_path / "s")
    assert res.exit_code == 0, res.output
    from popyou_cli.models.checkpoints import load_vqvae

    assert load_vqvae(str(finetuned / "model")).config.vocab_size == load_vqvae("tiny").config.vocab_size


# ------------------------------------------------------------------------------------------ 8. Hub
def test_model_card_and_push_to_hub(finetuned, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def create_repo(repo_id, **kw):
        calls.append(("create", repo_id, kw))

    def upload_folder(**kw):
        calls.append(("upload", kw["repo_id"], kw))
        assert (Path(kw["folder_path"]) / "README.md").is_file()  # the card travels with the folder
        return type("Info", (), {"commit_url": f"https://hf.co/{kw['repo_id']}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    res = invoke("finetune", *TINY_FT, "--data", encoded_stage(), "--out", tmp_path / "ft", "--push-to-hub",
                 "me/funko-var", "--private")
    assert res.exit_code == 0, res.output
    assert "pushed: https://hf.co/me/funko-var/commit/1" in " ".join(res.output.split())
    assert calls[0][0] == "create" and calls[0][1] == "me/funko-var" and calls[0][2]["private"] is True
    assert calls[1][0] == "upload" and Path(calls[1][2]["folder_path"]) == tmp_path / "ft" / "model"
    card = (tmp_path / "ft" / "model" / "README.md").read_text()
    assert "popyou sample --var me/funko-var --class-id 10" in card and "## How it was trained" in card
    assert "2 steps" in card and card.startswith("---\nlibrary_name: popyou")
    calls.clear()
    res = invoke("train-adapter", *TINY_FT, "--var", finetuned / "model", "--data", encoded_stage(),
                 "--out", tmp_path / "ad", "--push-to-hub", "me/funko-pipe")
    assert res.exit_code == 0, res.output
    assert calls[0][2]["private"] is False and Path(calls[1][2]["folder_path"]) == tmp_path / "ad" / "pipeline"
    card = (tmp_path / "ad" / "pipeline" / "README.md").read_text()
    assert '--pipeline me/funko-pipe' in card and 'Pipeline.from_pretrained("me/funko-pipe")' in card
    assert "pipeline_tag: text-to-image" in card and "Held-out loss" in card
    assert json.loads((tmp_path / "ad" / "pipeline" / "pipeline.json").read_text())["train"]["steps"] == 2
