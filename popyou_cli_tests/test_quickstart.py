"""examples/quickstart.sh, run as a user would: every stage's output is there and usable."""
import json

import numpy as np
from datasets import load_from_disk
from PIL import Image

from popyou_cli.infer.video import read_mp4


def test_quickstart_runs_every_stage(quickstart):
    work, proc = quickstart
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in range(1, 9):
        assert f"== {step}/8" in proc.stdout
    assert "Where things are" in proc.stdout
    # data stages: loadable datasets with the documented columns
    assert len(load_from_disk(str(work / "data"))) == 48
    assert "caption" in load_from_disk(str(work / "cap")).column_names
    enc = load_from_disk(str(work / "enc"))
    assert {"codes", "codes_flip", "siglip_image", "siglip_text_prompt", "siglip_text_caption"} <= set(enc.column_names)
    # training stages: a model folder and two pipelines
    assert json.loads((work / "ft" / "model" / "config.json").read_text())["config"]["num_classes"] == 11
    for stage in ("img", "txt"):
        assert (work / stage / "pipeline" / "pipeline.json").is_file()
    # sample: 2 prompts x 2 images, a grid, records
    records = [json.loads(x) for x in (work / "samples" / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["seed"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in records:
        assert np.asarray(Image.open(work / "samples" / r["path"])).shape == (64, 64, 3)
    assert len(read_mp4(work / "sweep" / "beta_sweep.mp4")) == 6  # --beta-sweep 0:2.5:6
    # eval: metrics and a report a person can read
    m = json.loads((work / "eval" / "metrics.json").read_text())
    assert m["n_prompts"] == 8 and -1 <= m["siglip_score"] <= 1 and np.isfinite(m["fid"]) and m["fid"] >= 0
    assert set(m["heldout_nll"]) >= {"right", "shuffled", "class_only"}
    assert -1 <= m["siglip_score_dataset"] <= 1  # held-out prompts: their own dataset images are the reference
    report = (work / "eval" / "report.html").read_text()
    assert report.count("<img ") == 16  # each generated image beside the data set's image of its prompt
