"""`popyou eval` on the quick-start's pipeline: metrics, report, prompts from a file, bad input."""
import json
import shutil

import numpy as np
import pytest
import torch

from helpers import invoke, one_line_error


@pytest.fixture(scope="module", autouse=True)
def fid_cache(tmp_path_factory):
    """popyou's cache folder for this module: the FID reference features of one data set are computed once."""
    cache = tmp_path_factory.mktemp("popyou-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POPYOU_CACHE", str(cache))
        yield cache


def test_eval_with_prompt_file(work, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a wizard funko pop\na knight funko pop\na robot funko pop\n")
    out = tmp_path / "eval"
    res = invoke("eval", "--pipeline", work / "txt" / "pipeline", "--prompt-file", prompts, "--out", out, "--siglip-fid")
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_prompts"] == 3 and m["n_reference_images"] > 3
    for key in ("siglip_score", "fid", "kid", "fid_siglip", "images_per_s"):
        assert np.isfinite(m[key]), key
    assert m["images_per_s"] > 0 and m["fid"] >= 0
    assert "siglip_score_dataset" not in m  # the dataset's images do not pair with prompts from a file
    nll = m["heldout_nll"]
    assert 0 < nll["right"] < 10 and 0 < nll["shuffled"] < 10 and nll["rows"] > 0
    report = (out / "report.md").read_text()
    assert all(p in report for p in prompts.read_text().split("\n") if p)
    assert len(list((out / "images").glob("*.png"))) == 3


def test_eval_bad_input(work, tmp_path):
    res = invoke("eval", "--out", tmp_path / "o")
    assert res.exit_code == 1 and "--pipeline" in res.output
    broken = tmp_path / "broken"
    shutil.copytree(work / "txt" / "pipeline", broken)
    (broken / "pipeline.json").unlink()
    res = invoke("eval", "--pipeline", broken, "--out", tmp_path / "o")
    assert res.exit_code == 1 and "not a popyou pipeline folder" in res.output
    res = invoke("eval", "--pipeline", work / "txt" / "pipeline", "--data", tmp_path / "nothing", "--out", tmp_path / "o")
    assert res.exit_code == 1 and "not there" in res.output


def test_report_says_what_the_numbers_mean(work, tmp_path, fid_cache):
    import re

    out = tmp_path / "eval"
    res = invoke("eval", "--pipeline", work / "txt" / "pipeline", "--n-prompts", 4, "--out", out)
    assert res.exit_code == 0, res.output
    assert "eval: generating 4/4 images" in res.output  # progress, even in a log
    m = json.loads((out / "metrics.json").read_text())
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, page):  # one outline, two renderings
        assert "What the numbers say" in text and "Settings to reproduce" in text
        assert "text conditioning" in text and "nats/token" in text and "SigLIP" in text
        assert f"{m['heldout_nll']['right']:.3f}" in text
        assert not re.search(r"\d\.\d{6,}", text), "unrounded numbers"  # json.dumps' 17 digits are gone
        assert "popyou eval --pipeline" in text and "--n-prompts 4" in text
    # the data set's own image of each held-out prompt beside the generated one, at native size
    assert (out / "images" / "data_0003.png").is_file() and "images/data_0003.png" in md
    assert "image-rendering:pixelated" in page and 'width="128"' in page  # 64 px shown at exactly 2x
    # the FID reference features are cached in popyou's cache folder (never in the data folder) and reused
    assert list(fid_cache.rglob("*.npz")) and not list((work / "enc").glob(".popyou-fid-stats-*.npz"))
    again = invoke("eval", "--pipeline", work / "txt" / "pipeline", "--n-prompts", 4, "--out", tmp_path / "again")
    assert again.exit_code == 0, again.output
    m2 = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert m2["reference_cached"] is True and m2["fid"] == m["fid"]
    # random tiny models never get "works": a banner says what they are, and the verdict rests on an interval
    assert m["tiny_stand_ins"] is True and any("tiny random stand-ins" in c for c in m["caveats"])
    assert any("FID from 4 generated" in c for c in m["caveats"])  # under 100 images: mostly bias
    for text in (md, page):
        assert "tiny random stand-ins" in text and "Caution" in text
        assert "text conditioning works" not in text and "paired t over 10 rows" in text
    d = m["heldout_nll"]["shuffled_minus_right"]
    assert d["rows"] == 10 and d["low"] < d["mean"] < d["high"]
    assert m["fid_se"] > 0 and f"± {m['fid_se']:.1f}" in md  # FID with its bootstrap standard error
    # portable: no absolute path of this machine in any output
    for name in ("metrics.json", "report.md", "report.html"):
        text = (out / name).read_text()
        assert str(tmp_path.parents[1]) not in text and str(work) not in text, name


def test_eval_scores_existing_samples_without_training_data(work, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(work / "txt" / "pipeline", pipe)
    cfg = json.loads((pipe / "pipeline.json").read_text())
    cfg["train"]["data"] = str(tmp_path / "gone")  # the training data is not needed
    (pipe / "pipeline.json").write_text(json.dumps(cfg))
    out = tmp_path / "scored"
    res = invoke("eval", "--images", work / "samples", "--pipeline", pipe, "--out", out)
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["mode"] == "existing images" and m["n_images"] == 4 and np.isfinite(m["siglip_score"])
    assert "fid" not in m and "heldout_nll" not in m and "images_per_s" not in m  # nothing regenerated
    res = invoke("eval", "--images", work / "samples", "--pipeline", pipe, "--reference", work / "data",
                 "--out", tmp_path / "with-fid")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "with-fid" / "metrics.json").read_text())
    assert np.isfinite(m["fid"]) and m["n_reference_images"] == 48
    assert "existing images" in (tmp_path / "with-fid" / "report.md").read_text()
    res = invoke("eval", "--images", tmp_path, "--out", tmp_path / "x")
    assert res.exit_code == 1 and "samples.jsonl" in res.output


def _nll(right, shuffled, class_only) -> dict:
    from popyou_cli.eval.heldout import heldout_summary

    return heldout_summary({"right": right, "shuffled": shuffled, "class_only": class_only})


def _centred(mean: float, noise) -> np.ndarray:
    return mean + noise - noise.mean()


def test_verdicts_state_the_finding_with_its_numbers():
    from popyou_cli.eval.report import render_html, render_markdown, verdicts

    rng = np.random.default_rng(0)
    # 50 rows, the means 0.0005 apart, rows scattered by 0.05: the interval straddles zero
    nll = _nll(_centred(3.1927, rng.normal(0, 0.05, 50)), _centred(3.1922, rng.normal(0, 0.05, 50)),
               _centred(3.4, rng.normal(0, 0.05, 50)))
    lines = verdicts({"heldout_nll": nll})
    assert "text conditioning has no measurable effect: NLL right 3.193 ≈ shuffled 3.192" in lines[0]
    assert "not enough evidence" in lines[0] and "paired t over 50 rows" in lines[0]
    # the right text lowers the NLL of every row: "works", with the interval it rests on
    noise = rng.normal(0, 0.01, 50)
    nll = _nll(_centred(2.9, noise), _centred(3.2, noise + rng.normal(0, 0.01, 50)), _centred(3.3, noise))
    lines = verdicts({"heldout_nll": nll})
    assert lines[0].startswith("text conditioning works") and "2.900 < shuffled 3.200" in lines[0]
    assert "95% interval" in lines[0] and lines[1].startswith("the text delta is better than the class alone")
    blocks = [("title", "t"), ("list", ["a [b] :end: <c>"]), ("code", "popyou eval --out x")]
    assert "a [b] :end: <c>" in render_markdown(blocks) and "a [b] :end: &lt;c&gt;" in render_html(blocks)


def test_tiny_random_models_never_get_works():
    from popyou_cli.eval.report import verdicts

    # the per-row held-out NLL of the quick-start's tiny text pipeline (10 held-out rows)
    right = [3.3591, 3.2823, 2.7369, 2.7366, 3.0072, 3.0906, 3.0037, 3.1362, 3.1732, 3.1646]
    shuffled = [3.3137, 3.2655, 2.8917, 2.7559, 2.9847, 3.1286, 3.0629, 3.0471, 3.1814, 3.1981]
    class_only = [3.0940, 3.3001, 2.7185, 2.5142, 3.0165, 2.9952, 2.9560, 3.0610, 3.0567, 3.0992]
    first = verdicts({"heldout_nll": _nll(right, shuffled, class_only)})[0]
    assert "not enough evidence" in first and "works" not in first  # 0.5% lower, but the interval includes 0
    # even a clear effect on these rows is no "works" for the stand-ins: they say nothing about the method
    clear = _nll([3.0] * 5 + [3.1] * 5, [3.2] * 5 + [3.35] * 5, [3.3] * 10)
    assert verdicts({"heldout_nll": clear})[0].startswith("text conditioning works")
    first = verdicts({"heldout_nll": clear, "tiny_stand_ins": True})[0]
    assert "works" not in first.split(":")[0] and "tiny random stand-ins" in first


def test_other_verdicts_need_their_evidence():
    from popyou_cli.eval.report import caveats, verdicts

    base = {"siglip_score": 0.30, "siglip_score_dataset": 0.29, "n_images": 8}
    from popyou_cli.eval.metrics import paired_difference

    close = paired_difference([0.30, 0.35, 0.25, 0.31], [0.29, 0.27, 0.33, 0.27]).as_dict()
    line = verdicts({**base, "siglip_score_difference": close})[0]
    assert line.startswith("prompt agreement: not enough evidence") and "over 4 rows" in line
    fid = {"fid": 250.0, "fid_se": None, "kid": 0.010, "kid_std": 0.006, "n_images": 8, "n_reference_images": 38}
    lines = verdicts(fid)
    assert lines[0].startswith("image distribution: not enough evidence") and "8 generated and 38 reference" in lines[0]
    assert "point estimate" in lines[0]
    assert any("under 100 images" in c for c in caveats(fid)) and not caveats({**fid, "n_images": 500,
                                                                              "n_reference_images": 500})


# ------------------------------------------------------------------------------------------ lineage
def _copy_data(work, dest):
    """A copy of the quick-start's data chain (gen-data, caption, encode: parents are recorded relatively)."""
    for name in ("data", "cap", "enc"):
        shutil.copytree(work / name, dest / name)
    return dest / "enc"


def test_grown_data_keeps_the_held_out_rows_the_pipeline_held_out(work, tmp_path):
    from popyou_cli.train.conditioning import split_rows

    pipe = work / "txt" / "pipeline"
    enc = _copy_data(work, tmp_path)
    for args in (("gen-data", "--preset", "tiny", "--n", 64, "--shard-size", 16, "--out", tmp_path / "data"),
                 ("caption", "--data", tmp_path / "data", "--preset", "tiny", "--out", tmp_path / "cap"),
                 ("encode", "--data", tmp_path / "cap", "--preset", "tiny", "--hflip", "--out", enc)):
        res = invoke(*args)
        assert res.exit_code == 0, res.output
    before = invoke("eval", "--pipeline", pipe, "--data", work / "enc", "--n-prompts", 2, "--out", tmp_path / "before")
    grown = invoke("eval", "--pipeline", pipe, "--data", enc, "--n-prompts", 2, "--out", tmp_path / "grown")
    assert before.exit_code == 0 and grown.exit_code == 0, grown.output
    m0, m = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("before", "grown"))
    assert m0["data_check"]["status"] == "same"
    assert m["data_check"] == {"status": "grown", "rows_now": 64, "rows_trained": 48}
    assert m["heldout_index"] == m0["heldout_index"] and m["heldout_nll"]["right"] == m0["heldout_nll"]["right"]
    trained = set(range(48)) - set(m0["heldout_index"])
    assert not trained & set(m["heldout_index"])  # no training row scored
    naive = split_rows({"codes": torch.arange(64)[:, None]}, 0.2)[1]["codes"].flatten().tolist()
    assert trained & set(naive)  # a split of all 64 rows would have scored training rows: the check has teeth
    assert "only the 48 rows the pipeline saw" in (tmp_path / "grown" / "report.md").read_text()


def test_the_rows_a_pipeline_saw_are_found_in_a_grown_folder():
    from popyou_cli.eval.heldout import rows_seen
    from popyou_cli.store.lineage import content_digest

    s0 = {"file": "shard-00000-000000000-000000016.arrow", "sha256": "a"}
    short = {"file": "shard-00001-000000016-000000020.arrow", "sha256": "b"}  # 20 rows: a short last shard
    grown = {"n_rows": 40, "content": "now", "shards": [
        s0, {"file": "shard-00001-000000016-000000032.arrow", "sha256": "c", "prefixes": ["b"]},  # it grew
        {"file": "shard-00002-000000032-000000040.arrow", "sha256": "d"}]}
    assert rows_seen(grown, "now") == 40
    assert rows_seen(grown, content_digest([s0, short])) == 20
    assert rows_seen(grown, content_digest([s0])) == 16
    assert rows_seen(grown, content_digest(grown["shards"][:2])) == 32
    assert rows_seen(grown, content_digest([s0, {**short, "sha256": "other"}])) is None  # its rows changed
    assert rows_seen(grown, content_digest([{**s0, "sha256": "other"}])) is None


def test_regenerated_data_is_an_error_unless_allowed(work, tmp_path):
    pipe = work / "txt" / "pipeline"
    enc = _copy_data(work, tmp_path)
    res = invoke("encode", "--data", tmp_path / "cap", "--preset", "tiny", "--out", enc, "--overwrite")  # no --hflip
    assert res.exit_code == 0, res.output
    line = one_line_error(invoke("eval", "--pipeline", pipe, "--data", enc, "--n-prompts", 2, "--out", tmp_path / "o"))
    assert str(enc) in line and str(pipe) in line and "--allow-other-data" in line
    res = invoke("eval", "--pipeline", pipe, "--data", enc, "--n-prompts", 2, "--allow-other-data",
                 "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["data_check"]["status"] == "other" and any("--allow-other-data" in c for c in m["caveats"])
    md = (tmp_path / "o" / "report.md").read_text()
    assert "not what the pipeline was trained on" in md and "--allow-other-data" in md


def test_a_read_only_reference_set_works_and_stays_untouched(work, tmp_path):
    import os
    import stat

    ref = tmp_path / "ref"
    shutil.copytree(work / "data", ref)

    def listing():
        return sorted((str(p.relative_to(ref)), p.stat().st_size) for p in ref.rglob("*"))

    before = listing()
    for p in [ref, *ref.rglob("*")]:
        p.chmod(stat.S_IRUSR | stat.S_IXUSR if p.is_dir() else stat.S_IRUSR)
    try:
        res = invoke("eval", "--pipeline", work / "txt" / "pipeline", "--n-prompts", 2, "--reference", ref,
                     "--out", tmp_path / "o")
        assert res.exit_code == 0, res.output
        assert listing() == before  # nothing written into it (as root, chmod alone would prove nothing)
    finally:
        for p in [ref, *ref.rglob("*")]:
            p.chmod(stat.S_IRWXU if p.is_dir() else stat.S_IRUSR | stat.S_IWUSR)
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["n_reference_images"] == 48 and m["reference"].startswith("../ref ") and not os.path.isabs(m["data"])
