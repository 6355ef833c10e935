"""The model card (README.md) that finetune and train-adapter write into their result folder and push with it:
what the folder is, how it was trained, how to sample from it. The Hub shows it as the repo's page."""
from __future__ import annotations

from pathlib import Path

from popyou_cli.core.files import atomic_write, portable_path

CARD = "README.md"
_SHOWN_SETTINGS = ("lr", "batch_size", "grad_accum", "max_steps", "epochs", "warmup", "schedule", "mixed_precision",
                   "lora", "lora_rank", "lora_alpha", "label_smoothing", "cond_drop", "hflip", "seed")


def _front_matter(tags: list[str], base: str | None, pipeline_tag: str | None) -> str:
    lines = ["---", "library_name: popyou", "tags:"] + [f"- {t}" for t in tags]
    if pipeline_tag:
        lines.append(f"pipeline_tag: {pipeline_tag}")
    if base and base.count("/") >= 1 and not Path(base).expanduser().exists():
        lines.append(f"base_model: {'/'.join(base.split('/')[:2])}")  # a Hub id, not a local path
    return "\n".join(lines + ["---", ""])


def _settings_table(settings: dict) -> str:
    rows = [f"| {k} | {settings[k]} |" for k in _SHOWN_SETTINGS if settings.get(k) is not None]
    return "\n".join(["| setting | value |", "|---|---|", *rows]) if rows else ""


def model_card(kind: str, *, repo: str | None, folder: Path, facts: dict) -> str:
    """kind "model" (finetune's VAR model folder) or "pipeline" (train-adapter's pipeline folder). `facts`: what the
    stage knows (data, steps, preset, settings, class id/name, base VAR, losses, held-out eval)."""
    # The card is uploaded: a local folder is named relative to where popyou ran, never by its absolute path.
    where = repo or portable_path(folder, Path.cwd())
    settings = facts.get("settings") or {}
    loss = facts.get("losses") or []
    loss_line = f"Training loss {loss[0]:.4f} -> {loss[-1]:.4f} (nats/token). " if loss else ""
    trained = (f"Trained with `popyou {facts['stage']}` ({facts.get('preset', 'full')} preset) for {facts['steps']} "
               f"steps on the encoded data set `{facts.get('data')}`. {loss_line}")
    if kind == "pipeline":
        ev = facts.get("eval")
        held = (f"Held-out loss with the right embedding {ev['right']:.4f}, with shuffled embeddings "
                f"{ev['shuffled']:.4f}, with the class alone {ev['class_only']:.4f} (lower is better; right < "
                "shuffled means the adapter uses the text).") if ev else ""
        head = _front_matter(["popyou", "var", "text-to-image", "funko-pop"], facts.get("var"), "text-to-image")
        body = [
            "# popyou text-to-image pipeline", "",
            "A popyou pipeline: VAR (Visual AutoRegressive modeling) steered by a small "
            f"adapter that turns a SigLIP {facts.get('embedding', 'text')} embedding into a conditioning delta "
            f"(stage `{facts.get('stage_name', '')}`). Parts: `pipeline.json`, the adapter, the VAR "
            "(`var/` or a Hub id) and the VQ-VAE it decodes with.", "",
            "## How it was trained", "", trained + held, "", _settings_table(settings), "",
            "## How to sample", "", "```bash", "pip install popyou",
            f'popyou sample "a wizard funko pop" --pipeline {where} --n 4 --out samples', "```", "",
            "```python", "from popyou_cli import Pipeline", "",
            f'pipe = Pipeline.from_pretrained("{where}")', 'pipe("a wizard funko pop", seed=0)[0].save("wizard.png")',
            "```", ""]
    else:
        name = facts.get("class_name")
        head = _front_matter(["popyou", "var", "class-conditional"], facts.get("var"), None)
        body = [
            "# popyou VAR model", "",
            f"A class-conditional VAR (Visual AutoRegressive modeling) fine-tuned by popyou: class id "
            f"{facts['class_id']}" + (f" is '{name}'" if name else "") + f", starting from `{facts.get('var')}`. "
            "`config.json` records the class names and the VQ-VAE that decodes its codes.", "",
            "## How it was trained", "", trained, "", _settings_table(settings), "",
            "## How to sample", "", "```bash", "pip install popyou",
            f"popyou sample --var {where} --class-id {facts['class_id']} --n 4 --out samples", "```", "",
            "Text-to-image: train an adapter on top of it with `popyou train-adapter --var ...` (see the popyou "
            "README).", ""]
    return head + "\n".join(body)


def write_model_card(folder: Path, kind: str, *, repo: str | None = None, facts: dict) -> Path:
    path = Path(folder) / CARD
    atomic_write(path, model_card(kind, repo=repo, folder=Path(folder), facts=facts))
    return path
