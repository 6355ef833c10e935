"""The images stage: your own pictures (a folder of image files, or a Hub dataset) become a stage folder once, so
that `caption` and `encode` take `--data PICTURES` as they take a gen-data folder.

Where: beside the stage's output, `OUT/../NAME-images` (NAME: the picture folder's name, or the Hub dataset's).
It is the user's to see, move and delete with the rest of the work folder, and caption and encode writing into
the same folder share it. The summary line names it.

What: a stage folder (store.StageWriter: shards, manifest, content hashes, resume after a kill) with `index`,
`image` (the file's own bytes, unchanged; null for a bad file), `file_name` (its path in the folder; null for a
Hub dataset), `prompt` (the text of the picture: a metadata file's `prompt`, `caption` or `text` column, or the
Hub dataset's; only when there is one, so that `encode` embeds it and `train-adapter --stage text` trains on it)
and `images_error` ("" or why the row holds no usable picture: unreadable, not a regular file, undecodable,
truncated, under 8 px, listed in a metadata file but missing). A bad file keeps its row. Every picture is decoded
once here (images.open_rgb), so that its error is known before any model runs.

When: the manifest records where the pictures came from (relative to the folder) and their fingerprint
(picture_folder: paths, sizes and modification times; a Hub dataset: the cache files datasets made for it, which
name its revision). The same pictures: the folder is reused as it is (or finished, after a kill). Changed ones:
the folder is converted again, and a caption or encode folder made from the old one is refused until it is
remade with --overwrite (store.lineage). A folder there that popyou did not make, or another stage's, is never
replaced.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popyou_cli.core.errors import PopyouError, short_error
from popyou_cli.data.picture_folder import TEXT_COLUMNS, read_picture_folder
from popyou_cli.data.runner import DataStage, DataStageResult, check_workers, loader, read_cell, shard_batches

STAGE = "images"
ERROR = f"{STAGE}_error"
FORMAT = 1  # the stage's columns and rules: a folder written with another number is converted again
SHARD_SIZE = 256  # rows per shard file: a few hundred MB of photos, the unit of resume
BATCH = 16  # files a worker reads and checks at a time
DATASET_MARKS = ("popyou_stage.json", "state.json", "dataset_info.json", "dataset_dict.json", ".popyou-replacing")


def features(with_prompt: bool):
    import datasets

    cols = {"index": datasets.Value("int64"), "image": datasets.Image(), "file_name": datasets.Value("string")}
    if with_prompt:
        cols["prompt"] = datasets.Value("string")
    cols[ERROR] = datasets.Value("string")
    return datasets.Features(cols)


@dataclass
class Source:
    """Pictures to convert: rows with `source` (an image cell or a file path), `file_name`, `error` (known bad
    before reading) and, when there is a text, `prompt`; `settings` identify the content."""
    name: str  # NAME in OUT/../NAME-images
    label: str  # how messages name it
    spec: str  # what the user gave, recorded in the manifest (a local path relative to the folder)
    rows: Any  # datasets.Dataset
    settings: dict
    total_bytes: int
    details: str  # what the text is, for the summary line

    @property
    def with_prompt(self) -> bool:
        return "prompt" in self.rows.column_names


def folder_source(path: Path) -> Source:
    import datasets

    pf = read_picture_folder(path)
    string = datasets.Value("string")
    cols = pf.rows()
    rows = datasets.Dataset.from_dict(cols, features=datasets.Features({c: string for c in cols}))
    text = (f"texts from the '{pf.text_column}' column of {', '.join(pf.metadata)}" if pf.text_column else
            "no texts (no metadata.jsonl or metadata.csv with a prompt, caption or text column)")
    if pf.ignored:
        text += f"; {len(pf.ignored)} other file(s) left out (not images by their extension, e.g. {pf.ignored[0]})"
    settings = {"format": FORMAT, "text_column": pf.text_column, "metadata": pf.metadata,
                "fingerprint": pf.fingerprint}
    return Source(name=pf.root.name or "pictures", label=str(path), spec=str(path), rows=rows, settings=settings,
                  total_bytes=pf.total_bytes, details=text)


def _hub_error(e: BaseException, spec: str, repo: str) -> PopyouError:
    from popyou_cli.core.hub import offline_mode

    where = f"no folder {spec} here, and the Hub dataset '{repo}'"
    if isinstance(e, ConnectionError) or offline_mode():
        return PopyouError(f"{where} is not in the local datasets cache while the Hub cannot be reached (offline: "
                           "HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set, or no network); run this command once "
                           "with network access to download it, or give a local folder of pictures")
    if type(e).__name__ in ("DatasetNotFoundError", "RepositoryNotFoundError", "FileNotFoundError"):
        return PopyouError(f"{where} does not exist, or it is private or gated (log in with `hf auth login`)")
    return PopyouError(f"{where} cannot be loaded: {short_error(e, 200, with_type=True)}")


def hub_source(ref, spec: str, image_column: str) -> Source:
    """The train split of a Hub dataset (through datasets.load_dataset and its cache)."""
    import datasets

    from popyou_cli.data.runner import undecoded

    if ref.repo_type == "space" or ref.filename:
        raise PopyouError(f"--data {spec}: name a Hub dataset as datasets/OWNER/NAME or OWNER/NAME (no Space, no "
                          "file inside it)")
    repo = f"datasets/{ref.repo_id}"
    try:
        ds = datasets.load_dataset(ref.repo_id, revision=ref.revision, split="train")
    except Exception as e:  # noqa: BLE001 - one line for every way a Hub load fails
        raise _hub_error(e, spec, repo) from None
    feats = ds.features
    column = image_column if isinstance(feats.get(image_column), datasets.Image) else next(
        (c for c, f in feats.items() if isinstance(f, datasets.Image)), None)
    if column is None:
        raise PopyouError(f"the Hub dataset '{repo}' has no image column (columns: {', '.join(feats)}); "
                          "--image-column names it")
    text = next((c for c in TEXT_COLUMNS if feats.get(c) == datasets.Value("string")), None)
    rows = undecoded(ds.select_columns([column, *([text] if text else [])]), column).rename_column(column, "source")
    if text and text != "prompt":
        rows = rows.rename_column(text, "prompt")
    rows = rows.add_column("file_name", [None] * len(rows)).add_column("error", [""] * len(rows))
    # datasets names its cache files after the dataset's revision and files: their names are the fingerprint.
    names = sorted("/".join(Path(f["filename"]).parts[-4:]) for f in ds.cache_files) or [ref.revision or "main"]
    settings = {"format": FORMAT, "split": "train", "image_column": column, "text_column": text,
                "fingerprint": hashlib.sha256(json.dumps(names).encode()).hexdigest()}
    return Source(name=ref.repo_id.split("/")[-1], label=repo, spec=repo + (f"@{ref.revision}" if ref.revision else ""),
                  rows=rows, settings=settings,
                  total_bytes=ds.data.nbytes, details=f"texts from its '{text}' column" if text else "no texts")


class Prepare:
    """In a worker: one row -> (row, image cell with the file's bytes or None, error, file name, prompt)."""

    def __call__(self, row: int, cells: dict):
        from popyou_cli.core.images import open_rgb

        data, error = (None, cells["error"]) if cells["error"] else read_cell(cells["source"])
        image = None
        if not error:
            picture, error = open_rgb(data)
            if picture is not None:
                raw = data if isinstance(data, (bytes, bytearray)) else data["bytes"]
                # No path: datasets would keep only a path that exists (relative to the current folder).
                image = {"bytes": bytes(raw), "path": None}
        return row, image, error, cells["file_name"], cells.get("prompt")


class Collate:
    def __init__(self, with_prompt: bool):
        self.with_prompt = with_prompt

    def __call__(self, items):
        rows = [it[0] for it in items]
        values = {"image": [it[1] for it in items], "file_name": [it[3] for it in items]}
        if self.with_prompt:
            values["prompt"] = [it[4] for it in items]
        values[ERROR] = [it[2] for it in items]
        return rows, values


@dataclass
class ImagesResult(DataStageResult):
    source: str = ""

    def summary(self) -> str:
        if not self.done:
            return (f"images: {self.out} holds the {self.n} pictures of {self.source}, unchanged: reused"
                    f"{self.errors_note()}")
        return (f"images: converted the {self.n} pictures of {self.source} into {self.out} ({self.done} now: "
                f"{self.work_note()}; {self.details}), once: reused while {self.source} is unchanged{self.errors_note()}")


def _existing(target: Path, out: Path, label: str) -> dict | None:
    """The manifest of an earlier conversion in `target`; a one-line error when `target` holds anything else."""
    from popyou_cli.store import read_manifest
    from popyou_cli.store.layout import is_being_replaced

    if os.path.realpath(target) == os.path.realpath(out):
        raise PopyouError(f"--out {out} is the folder popyou converts {label} into; choose another --out")
    if not target.is_dir() or not any(not p.name.startswith(".") for p in target.iterdir()):
        return None
    manifest = read_manifest(target)
    if (manifest is None and not is_being_replaced(target)) or (manifest is not None and manifest["stage"] != STAGE):
        raise PopyouError(f"popyou converts {label} into {target}, but that folder holds something else; move it "
                          "away, or choose an --out in another folder")
    return manifest


def import_images(source: Source, target: str | os.PathLike, *, out: str | os.PathLike, device: str = "auto",
                  workers: int = 0, progress: bool = True, console=None) -> ImagesResult:
    """Convert `source` into the stage folder `target`, or reuse (finish) the conversion already there."""
    from popyou_cli.core.files import portable_spec

    target = Path(target)
    check_workers(workers)
    settings = {**source.settings, "source": portable_spec(source.spec, target)}
    old = _existing(target, Path(out), source.label)
    changed = old is not None and (old.get("settings") != settings or old.get("shard_size") != SHARD_SIZE)
    run = DataStage(STAGE, device)
    if changed and run.is_main_process and console is not None:
        console.print(f"images: {source.label} is not what {target} was converted from; converting it again",
                      highlight=False, soft_wrap=True)
    n = len(source.rows)
    specs = run.open(target, parent=None, settings=settings, features=features(source.with_prompt), n_rows=n,
                     shard_size=SHARD_SIZE, overwrite=changed, row_bytes=source.total_bytes // n + 1024)
    if specs:
        batches = loader(source.rows, Prepare(), Collate(source.with_prompt), shard_batches(specs, BATCH), workers)
        with run.running(progress, console) as advance:
            run.write_in_shards(batches, advance)
    res = run.finish(ERROR, ImagesResult, what="converted", details=source.details, source=source.label)
    if res.is_main_process and console is not None:
        console.print(res.summary(), highlight=False, soft_wrap=True)
    return res


def is_dataset_folder(path: Path) -> bool:
    """A folder load_stage reads: a stage folder, a save_to_disk one, or what is left of either."""
    return any(os.path.lexists(path / name) for name in DATASET_MARKS)


def stage_input(data: str | os.PathLike, out: str | os.PathLike, *, image_column: str, device: str = "auto",
                workers: int = 0, progress: bool = True, console=None) -> tuple[Path, str]:
    """What a data stage reads for its --data, and the image column there: a dataset folder as it is; a folder of
    pictures or a Hub dataset id through its conversion, `OUT/../NAME-images`, made or reused here."""
    from popyou_cli.core.hub import parse_spec
    from popyou_cli.store import check_not_same

    path = Path(data).expanduser()
    if path.is_dir():
        if is_dataset_folder(path):
            return path, image_column
        check_not_same(path, out)  # an --out inside the pictures would be listed as pictures
        source = folder_source(path)
    else:
        ref = None if path.exists() else parse_spec(str(data))
        if ref is None:
            return path, image_column  # a file, or nothing there: load_stage says which
        source = hub_source(ref, str(data), image_column)
    target = Path(out).parent / f"{source.name}-images"
    import_images(source, target, out=out, device=device, workers=workers, progress=progress, console=console)
    return target, "image"
