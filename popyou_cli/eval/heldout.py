"""The rows `popyou eval` scores a pipeline on, and their held-out NLL row by row.

Which rows. train-adapter records the content hash of its training data (pipeline.json `train.data_content`: the
encode folder's manifest digest, store/lineage.py). eval compares it with the data folder it is given:

* the same digest: the folder is as the pipeline saw it; its held-out rows are `split_rows` of all its rows;
* a grown folder (more rows, the old ones unchanged): the digest of its first shards, the last one perhaps in
  the shorter form it had before it grew (the `prefixes` of its manifest entry), is the recorded one. The
  pipeline saw those first rows only, so only they are split, with their count: the held-out rows are the
  ones train-adapter held out, and no training row is scored;
* anything else (the rows it saw were regenerated, or it is another data set): a one-line error naming both
  folders, unless `allow_other` (`--allow-other-data`), and then the report says so;
* no recorded hash (an imported or older pipeline, data without content hashes): used as it is.

The NLL: next-scale cross-entropy of each held-out row (mean over its tokens, as VAR's training loss) with its
own embedding, with another row's (a fixed permutation) and with the class
alone. Per row, because the verdict compares them row by row (metrics.paired_difference).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from popyou_cli.core.errors import PopyouError
from popyou_cli.eval.metrics import paired_difference



@dataclass(frozen=True)
class DataCheck:
    """How the data eval is given relates to the data the pipeline was trained on."""
    status: str  # "same", "grown", "other" (scored with --allow-other-data) or "unrecorded"
    rows_now: int  # rows in the data folder now
    rows_trained: int | None  # how many of its first rows the pipeline saw (None: unknown, all are used)

    def as_dict(self) -> dict:
        return {"status": self.status, "rows_now": self.rows_now, "rows_trained": self.rows_trained}


def rows_seen(manifest: dict, digest: str) -> int | None:
    """How many first rows of the folder with `manifest` made up the folder whose content digest was `digest`
    (None: no such prefix, the rows changed). lineage.content_digest hashes one line per shard, so the digest of
    each prefix of the shard list is that hash after its lines: it is carried along, shard by shard."""
    from popyou_cli.store.layout import shard_name
    from popyou_cli.store.lineage import shard_range

    if manifest.get("content") == digest:
        return int(manifest["n_rows"])
    h = hashlib.sha256()
    for e in manifest.get("shards", []):
        k, start, stop = shard_range(e["file"])
        for sha in e.get("prefixes", []):  # this shard was shorter then: stop unknown, each one is tried
            for short_stop in range(start + 1, stop):
                candidate = h.copy()
                candidate.update(f"{shard_name(k, start, short_stop)} {sha}\n".encode())
                if candidate.hexdigest() == digest:
                    return short_stop
        h.update(f"{e['file']} {e['sha256']}\n".encode())
        if h.hexdigest() == digest:
            return stop
    return None


def check_training_data(train: dict, pipeline: str, data: Path, allow_other: bool) -> DataCheck:
    """`train` is pipeline.json's training record. Raises the one-line error when the rows it saw changed."""
    from popyou_cli.store import read_manifest

    try:
        manifest = read_manifest(data) or {}
    except Exception:  # noqa: BLE001 - a plain datasets folder: no content hashes to compare
        manifest = {}
    n_now = int(manifest.get("n_rows") or 0)
    recorded = str(train.get("data_content") or "")
    if not recorded.startswith("sha256:"):
        return DataCheck("unrecorded", n_now, None)
    n_seen = rows_seen(manifest, recorded.removeprefix("sha256:")) if manifest.get("shards") else None
    if n_seen is not None:
        return DataCheck("same" if n_seen == n_now else "grown", n_now, n_seen)
    if not allow_other:
        raise PopyouError(f"{data} no longer holds the rows {pipeline} was trained on (regenerated, or other data): "
                          f"pass --data with its training data, or --allow-other-data to score on {data} anyway")
    return DataCheck("other", n_now, None)


@dataclass
class HeldOut:
    rows: dict  # the held-out rows (codes, embedding column) for the NLL
    index: np.ndarray  # their `index` in the data set (prompts, data set images)
    train_index: np.ndarray  # the training rows' `index` (the FID reference)
    column: str  # the embedding column the pipeline reads


def held_out(pipe, data: Path, val_fraction: float, check: DataCheck, console=None) -> HeldOut:
    """The pipeline's split of the rows it saw (all rows when that is unknown)."""
    from popyou_cli.train.conditioning import load_encoded, split_rows

    enc = pipe.config.get("encoder", {})
    column = ("siglip_image" if enc.get("embedding", "image") == "image"
              else f"siglip_text_{enc.get('text_field') or 'prompt'}")
    loaded = load_encoded(data, for_stage="eval", columns=[column], patch_nums=pipe.var.config.patch_nums,
                          console=console)
    rows, index = loaded["rows"], loaded["index"]
    if check.rows_trained is not None:  # rows added after training were never seen: left out of the split
        seen = torch.from_numpy(index < check.rows_trained)
        rows, index = {k: v[seen] for k, v in rows.items()}, index[seen.numpy()]
    rows["_pos"] = torch.arange(len(rows["codes"]))
    train_rows, val_rows = split_rows(rows, val_fraction)
    if val_rows is None:
        raise PopyouError("the pipeline was trained with no held-out rows (val_fraction 0); pass --val-fraction "
                          "or --prompt-file FILE")
    pos, train_pos = val_rows.pop("_pos").numpy(), train_rows.pop("_pos").numpy()
    return HeldOut(val_rows, index[pos], index[train_pos], column)


def heldout_summary(per_row: dict) -> dict:
    """metrics.json's `heldout_nll`: the mean of each (right, shuffled, class_only, as train-adapter's eval.json),
    the row count, and the paired differences the verdicts rest on (shuffled - right > 0: the right text helps)."""
    right = np.asarray(per_row["right"], np.float64)
    means = {k: float(np.mean(np.asarray(per_row[k], np.float64))) for k in ("right", "shuffled", "class_only")}
    return {**means, "rows": len(right),
            "shuffled_minus_right": paired_difference(per_row["shuffled"], right).as_dict(),
            "class_only_minus_right": paired_difference(per_row["class_only"], right).as_dict()}
