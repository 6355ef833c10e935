"""The command line as a practitioner meets it (issue 14): truthful --help, progress in log files, one spelling
per concept, run folders where model folders are meant, model cards and Hub pushes."""
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import encoded_stage, invoke, one_line_error
from popyou_cli.cli.app import app

CLI_DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
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


def _every_command() -> list[list[str]]:
    import typer.main

    def walk(group, path):
        for name, command in group.commands.items():
            yield from walk(command, [*path, name]) if hasattr(command, "commands") else [[*path, name]]

    return [[], ["bench"], *walk(typer.main.get_command(app), [])]


def test_every_help_fits_80_columns_with_flags_shown_as_flags():
    # sample --help used to be 204 lines at 80 columns, with a 14-character help column, 8 values cut off ("…")
    # and <bool> after every flag.
    commands = _every_command()
    assert ["bench", "startup"] in commands and ["sample"] in commands
    for command in commands:
        res = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
        assert res.exit_code == 0, (command, res.output)
        lines = res.output.splitlines()
        assert max(len(line) for line in lines) <= 80, command
        assert not [line for line in lines if "…" in line], (command, [line for line in lines if "…" in line])
        assert "<bool>" not in res.output, command
    sample = CliRunner().invoke(app, ["sample", "--help"], env={"COLUMNS": "80"}).output
    assert len(sample.splitlines()) < 100
    for panel in ("Model", "Sampling", "Output", "Speed", "Progress"):
        assert f"╭─ {panel}" in sample, panel
    assert "needs --pipeline" not in " ".join(sample.split())


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
    from popyou_cli.cli.common import DTYPES, PRESETS, QUANTIZE_MODES
    from popyou_cli.models.fast import QUANTIZE_MODES as FAST_MODES
    from popyou_cli.core.presets import FINETUNE_PRESETS

    assert set(PRESETS) == set(FINETUNE_PRESETS) and DTYPES[0] == "auto"
    assert QUANTIZE_MODES == FAST_MODES
    assert all(devices.parse_dtype(d) in (None, torch.float32, torch.bfloat16, torch.float16) for d in DTYPES)
    for short in DTYPES[1:]:  # what --help lists, devices parses and names back the same way
        assert devices.dtype_name(devices.parse_dtype(short)) == short


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
def test_spelling_table_matches_the_help():
    text = CLI_DOC.read_text()
    table = text[text.index("## One spelling per concept"):]
    table = table[:table.index("\n\n", table.index("|---"))]
    rows = [r for r in table.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert len(rows) >= 7
    helps = {c: _help(*c.split()) for c in (*COMMANDS, "bench sample", "bench train")}
    for row in rows:
        spelling = row.split("|")[2]
        for flag in re.findall(r"--[a-z][a-z-]*", spelling):
            assert any(flag in h for h in helps.values()), flag


def test_usage_errors_are_one_line_with_status_2():
    # click's boxed panel (usage line, hint, box) used to take six lines; the removed pre-release spellings are
    # unknown options now.
    for args, words in ((["sample", "--bogus"], "no such option: --bogus"), (["sample", "--n", "abc"], "'--n'"),
                        (["encode", "--flip"], "no such option: --flip"), (["gen-data"], "missing option"),
                        (["bench", "sample", "--tiny"], "no such option: --tiny")):
        msg = one_line_error(invoke(*args), exit_code=2)
        assert words in msg.lower() and msg.endswith("--help)"), msg


def test_a_value_after_a_flag_is_an_error_not_a_prompt(tmp_path):
    # `--more-smooth true` used to sample a second prompt "true".
    for flag, word in (("--more-smooth", "true"), ("--fast", "no"), ("--more-smooth", "0")):
        msg = one_line_error(invoke("sample", "a wizard", flag, word, "--out", tmp_path))
        assert f"{flag} is a flag and takes no value: drop '{word}'" in msg
    assert not any(tmp_path.iterdir())
    msg = one_line_error(invoke("sample", "--dtype", "float64", "x", "--out", tmp_path))  # checked while parsing
    assert msg == "error: unknown dtype 'float64': --dtype must be auto, fp32, bf16 or fp16"


def test_a_prompt_given_as_a_prompt_file_is_one_clear_line(tmp_path):
    msg = one_line_error(invoke("sample", "--prompt-file", "a wizard funko pop", "--out", tmp_path))
    assert "one prompt per line" in msg and 'popyou sample "a wizard funko pop"' in msg
    msg = one_line_error(invoke("eval", "--pipeline", "x", "--prompt-file", "a knight", "--out", tmp_path))
    assert "one prompt per line" in msg


def test_a_prompt_that_names_a_text_file_asks_for_prompt_file(tmp_path, monkeypatch):
    # `popyou sample prompts.txt` used to spend minutes on a picture of the words "prompts.txt".
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a wizard funko pop\n")
    msg = one_line_error(invoke("sample", "prompts.txt", "--out", tmp_path / "out"))
    assert msg == "error: 'prompts.txt' is a file, not a prompt: did you mean --prompt-file prompts.txt?"
    assert not (tmp_path / "out").exists()


def test_the_full_preset_on_a_cpu_names_the_preset_not_a_flag_never_given(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 training runs on this machine's GPU")
    for command in ("finetune", "train-adapter"):
        msg = one_line_error(invoke(command, "--data", encoded_stage(), "--out", tmp_path / command))
        assert "the full preset trains in fp16 on a GPU" in msg and "pass --preset tiny, or --dtype fp32" in msg
        assert "--dtype fp16" not in msg
    msg = one_line_error(invoke("finetune", "--dtype", "fp16", "--data", encoded_stage(), "--out", tmp_path / "x"))
    assert "--dtype fp16 needs a CUDA GPU" in msg  # a flag the user gave is named as given


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
