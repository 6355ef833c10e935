"""Your own pictures: `caption` and `encode` take a folder of image files (with metadata.jsonl / metadata.csv texts,
or none) or a Hub dataset id as --data, converted once into `OUT/../NAME-images` (data/import_images.py). The
whole quick-start chain trains on such a folder; bad files keep their rows; a rerun reuses the conversion and a
changed folder is converted again. CPU only, offline (the Hub dataset comes from the test Hub over HTTP)."""
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from helpers import invoke, one_line_error
from hub_server import go_offline, local_hub_fixture  # noqa: F401 - the local_hub fixture
from popyou_cli.data.picture_folder import read_picture_folder
from popyou_cli.store import load_stage, read_manifest

TINY = ["--preset", "tiny", "--device", "cpu", "--no-progress"]
N = 12


def picture(k: int) -> Image.Image:
    """Picture k: its own background colour and a bar at its own height (distinct simple pictures)."""
    a = np.zeros((72, 80, 3), np.uint8)
    a[:] = ((37 * k) % 256, (91 * k + 40) % 256, (53 * k + 90) % 256)
    a[4 * k:4 * k + 12, 8:72] = 255 - a[0, 0]
    return Image.fromarray(a)


def png(k: int) -> bytes:
    buf = io.BytesIO()
    picture(k).save(buf, format="PNG")
    return buf.getvalue()


def make_pictures(folder, n: int = N, metadata: str | None = "jsonl", column: str = "text") -> list[str]:
    """n PNGs under `folder` (every third in a subfolder) and their texts; returns the file names, sorted."""
    names = sorted(f"{'sub/' if k % 3 == 0 else ''}pic{k:02d}.png" for k in range(n))
    for k, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png(k))
    texts = [{"file_name": name, column: f"picture {k} in colour {37 * k % 256}"} for k, name in enumerate(names)]
    if metadata == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    elif metadata == "csv":
        with open(folder / "metadata.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file_name", column])
            w.writeheader()
            w.writerows(texts)
    return names


def ok(res):
    assert res.exit_code == 0, res.output
    return res.output


def test_a_picture_folder_trains_through_the_quick_start_chain(tmp_path):
    pics, w = tmp_path / "my pictures", tmp_path / "work"
    names = make_pictures(pics)
    out = ok(invoke("caption", "--data", pics, "--out", w / "cap", "--workers", 0, *TINY))
    assert f"converted the {N} pictures of {pics} into {w / 'my pictures-images'}" in out
    conv = load_stage(w / "my pictures-images")
    assert conv["file_name"] == names and conv["images_error"] == [""] * N
    assert conv["prompt"] == [f"picture {k} in colour {37 * k % 256}" for k in range(N)]
    assert [c["bytes"] for c in conv.cast_column("image", datasets.Image(decode=False))["image"]] == \
        [(pics / n).read_bytes() for n in names]  # the files' own bytes
    ok(invoke("encode", "--data", w / "cap", "--out", w / "enc", "--hflip", "--workers", 0, *TINY))
    enc = load_stage(w / "enc")
    assert {"siglip_text_prompt", "siglip_text_caption", "codes_flip"} <= set(enc.column_names)
    assert enc["encode_error"] == [""] * N
    # The independent truth: datasets' own imagefolder loader, saved and encoded the way that worked before.
    plain = tmp_path / "plain"
    datasets.load_dataset("imagefolder", data_dir=str(pics), split="train",
                          cache_dir=str(tmp_path / "hf")).save_to_disk(str(plain))
    ok(invoke("encode", "--data", plain, "--out", tmp_path / "plain-enc", "--text-column", "text", "--workers", 0,
              *TINY))
    ref = load_stage(tmp_path / "plain-enc")
    assert np.array_equal(np.array(enc["codes"]), np.array(ref["codes"]))
    assert np.array_equal(np.array(enc["siglip_text_prompt"]), np.array(ref["siglip_text_text"]))
    assert not np.array_equal(np.array(enc["codes"][0]), np.array(enc["codes"][1]))  # distinct pictures
    # finetune -> train-adapter (image, then text) -> sample, the quick-start's tiny flags
    ok(invoke("finetune", "--preset", "tiny", "--data", w / "enc", "--max-steps", 4, "--out", w / "ft"))
    ok(invoke("train-adapter", "--preset", "tiny", "--stage", "image", "--var", w / "ft" / "model", "--data",
              w / "enc", "--max-steps", 4, "--out", w / "img"))
    ok(invoke("train-adapter", "--preset", "tiny", "--stage", "text", "--init", w / "img" / "pipeline", "--data",
              w / "enc", "--max-steps", 4, "--out", w / "txt"))
    assert json.loads((w / "txt" / "pipeline" / "pipeline.json").read_text())["encoder"]["text_field"] == "prompt"
    ok(invoke("sample", "picture 3 in colour 111", "--pipeline", w / "txt" / "pipeline", "--n", 2, "--out",
              w / "samples"))
    records = [json.loads(x) for x in (w / "samples" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert np.asarray(Image.open(w / "samples" / r["path"])).shape == (64, 64, 3)


def test_bad_files_keep_their_rows_with_the_reason(tmp_path):
    pics = tmp_path / "pics"
    make_pictures(pics, 4, metadata=None)
    (pics / "truncated.png").write_bytes(png(5)[:120])
    (pics / "notes.png").write_text("not a picture at all")
    (pics / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # unreadable: a link to nothing
    os.mkfifo(pics / "pipe.png")  # reading it would block forever
    (pics / "readme.txt").write_text("not an image by its extension: left out")
    (pics / "metadata.jsonl").write_text(json.dumps({"file_name": "missing.png", "text": "listed, not there"}) + "\n")
    out = ok(invoke("caption", "--data", pics, "--out", tmp_path / "cap", "--workers", 1, "--batch-size", 4, *TINY))
    assert "5 of 9 rows have an error in images_error" in out and "readme.txt" in out
    ds = load_stage(tmp_path / "cap")
    errors = dict(zip(ds["file_name"], ds["images_error"]))
    assert "truncated" in errors["truncated.png"] and "undecodable" in errors["notes.png"]
    assert "No such file" in errors["gone.jpg"] and "named pipe" in errors["pipe.png"]
    assert "no such file" in errors["missing.png"] and "readme.txt" not in errors
    assert [n for n, e in errors.items() if not e] == ["pic01.png", "pic02.png", "sub/pic00.png", "sub/pic03.png"]
    for name, image, caption, error in zip(ds["file_name"], ds.cast_column("image", datasets.Image(decode=False))[
            "image"], ds["caption"], ds["caption_error"]):
        assert (image is None) == bool(errors[name]) and bool(caption) == (not errors[name]), name
        assert bool(error) == bool(errors[name])
    assert ds["prompt"][ds["file_name"].index("missing.png")] == "listed, not there"


def test_rerun_reuses_the_conversion(tmp_path):
    pics = tmp_path / "pics"
    make_pictures(pics, 6)
    ok(invoke("caption", "--data", pics, "--out", tmp_path / "cap", "--workers", 0, *TINY))
    conv = tmp_path / "pics-images"
    def files():  # every file but the lock, which each run takes
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in conv.iterdir() if p.name != ".popyou.lock"}

    before = files()
    out = ok(invoke("caption", "--data", pics, "--out", tmp_path / "cap", "--workers", 0, *TINY))
    assert f"{conv} holds the 6 pictures of {pics}, unchanged: reused" in out and "nothing to do" in out
    out = ok(invoke("encode", "--data", pics, "--out", tmp_path / "enc", "--workers", 0, *TINY))
    assert "unchanged: reused" in out and "converted" not in out
    assert files() == before
    # encode straight from the pictures: the image and prompt embeddings, no caption
    enc = load_stage(tmp_path / "enc")
    assert "siglip_text_prompt" in enc.column_names and "caption" not in enc.column_names


def test_a_killed_conversion_is_finished_not_redone(tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    for k in range(260):  # two shards of the conversion: 256 + 4 rows
        (pics / f"{k:03d}.png").write_bytes(png(k))
    args = ["--shard-size", "130", "--workers", "0", *TINY]
    ok(invoke("caption", "--data", pics, "--out", tmp_path / "cap", *args))
    conv = tmp_path / "pics-images"
    first, second = sorted(conv.glob("shard-*.arrow"))
    kept, made = (first.stat().st_ino, first.read_bytes()), second.read_bytes()
    for p in (second, conv / "state.json", conv / "dataset_info.json"):  # what a kill before the end leaves
        p.unlink()
    out = ok(invoke("caption", "--data", pics, "--out", tmp_path / "cap", *args))
    assert "converted the 260 pictures" in out and "(4 now" in out  # only the missing shard
    assert (first.stat().st_ino, first.read_bytes()) == kept and second.read_bytes() == made
    assert "caption: " in out and "nothing to do" in out  # the same content: the captions still fit


def test_a_changed_folder_is_converted_again(tmp_path):
    pics = tmp_path / "pics"
    names = make_pictures(pics, 6)
    first = read_picture_folder(pics).fingerprint
    ok(invoke("caption", "--data", pics, "--out", tmp_path / "cap", "--workers", 0, *TINY))
    (pics / "sub" / "extra.png").write_bytes(png(9))  # added
    (pics / names[1]).unlink()  # removed
    (pics / names[2]).write_bytes(png(11))  # rewritten
    assert read_picture_folder(pics).fingerprint != first
    res = invoke("caption", "--data", pics, "--out", tmp_path / "cap", "--workers", 0, *TINY)
    assert "is not what" in res.output and "converting it again" in res.output
    # the caption folder was made from the old pictures: refused until remade
    assert "made from another version" in res.output.splitlines()[-1] and res.exit_code == 1
    out = ok(invoke("caption", "--data", pics, "--out", tmp_path / "cap", "--overwrite", "--workers", 0, *TINY))
    assert "unchanged: reused" in out
    ds = load_stage(tmp_path / "cap")
    assert ds["file_name"] == sorted([*names, "sub/extra.png"])
    errors = dict(zip(ds["file_name"], ds["images_error"]))  # metadata.jsonl still lists the removed picture
    assert "no such file" in errors.pop(names[1]) and set(errors.values()) == {""}
    rewritten = ds.cast_column("image", datasets.Image(decode=False))[ds["file_name"].index(names[2])]["image"]
    assert rewritten["bytes"] == png(11)
    assert read_manifest(tmp_path / "pics-images")["settings"]["fingerprint"] == read_picture_folder(pics).fingerprint


def test_the_fingerprint_sees_each_kind_of_change(tmp_path):
    pics = tmp_path / "pics"
    names = make_pictures(pics, 4)
    seen = [read_picture_folder(pics).fingerprint]
    assert read_picture_folder(pics).fingerprint == seen[0]  # nothing changed, nothing read twice differently

    def changed():
        now = read_picture_folder(pics).fingerprint
        assert now not in seen
        seen.append(now)

    (pics / "sub" / "new.png").write_bytes(png(7))  # a file added
    changed()
    (pics / names[0]).unlink()  # a file removed
    changed()
    st = (pics / names[1]).stat()
    data = bytearray((pics / names[1]).read_bytes())
    data[-20] ^= 1  # same size, other bytes, written later
    (pics / names[1]).write_bytes(bytes(data))
    os.utime(pics / names[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed()
    (pics / names[2]).rename(pics / "renamed.png")  # a file renamed
    changed()
    with open(pics / "metadata.jsonl", "a") as f:  # the texts edited
        f.write(json.dumps({"file_name": names[3], "text": "a second text"}) + "\n")
    changed()
    (pics / "notes.txt").write_text("not a picture: does not count")
    assert read_picture_folder(pics).fingerprint == seen[-1]


def test_csv_metadata_and_its_caption_column(tmp_path):
    pics = tmp_path / "pics"
    names = make_pictures(pics, 4, metadata="csv", column="caption")
    inner = names.index("sub/pic00.png")  # listed by the subfolder's own metadata file, relative to it
    rows = (pics / "metadata.csv").read_text().splitlines()
    (pics / "metadata.csv").write_text("\n".join([r for r in rows if not r.startswith("sub/pic00.png")] +
                                                 ['"",no file name: skipped']) + "\n")
    (pics / "sub" / "metadata.csv").write_text("file_name,caption\npic00.png,1984\n")
    ok(invoke("encode", "--data", pics, "--out", tmp_path / "enc", "--workers", 0, *TINY))
    conv = load_stage(tmp_path / "pics-images")
    want = [f"picture {k} in colour {37 * k % 256}" for k in range(4)]
    want[inner] = "1984"  # text, not a number
    assert conv["file_name"] == names and conv["prompt"] == want
    assert read_manifest(tmp_path / "pics-images")["settings"]["text_column"] == "caption"
    enc = load_stage(tmp_path / "enc")
    assert enc["encode_error"] == [""] * 4 and "siglip_text_prompt" in enc.column_names


def test_no_metadata_no_text_column(tmp_path):
    pics = tmp_path / "pics"
    make_pictures(pics, 5, metadata=None)
    out = ok(invoke("caption", "--data", pics, "--out", tmp_path / "cap", "--workers", 0, *TINY))
    assert "no texts" in out
    assert all(load_stage(tmp_path / "cap")["caption"])
    ok(invoke("encode", "--data", pics, "--out", tmp_path / "enc", "--workers", 0, *TINY))
    enc = load_stage(tmp_path / "enc")
    assert "prompt" not in enc.column_names and not any(c.startswith("siglip_text") for c in enc.column_names)
    assert enc["encode_error"] == [""] * 5 and np.abs(np.array(enc["siglip_image"])).sum() > 0


def test_two_processes_convert_once_and_equal_one(tmp_path):
    """caption on a picture folder in one `torchrun --nproc_per_node 2` launch on CPU: the conversion's two shards
    (256 + 4 rows) are split between the processes, and both folders equal a one-process run's."""
    pics = tmp_path / "pics"
    pics.mkdir()
    for k in range(260):
        (pics / f"{k:03d}.png").write_bytes(png(k))
    args = ["--shard-size", "130", "--batch-size", "8", "--workers", "0", *TINY]
    ok(invoke("caption", "--data", pics, "--out", tmp_path / "one" / "cap", *args))
    script = tmp_path / "two.py"
    script.write_text("from popyou_cli.cli.app import app\n"
                      f"app({['caption', '--data', str(pics), '--out', str(tmp_path / 'two' / 'cap'), *args]!r}, "
                      "standalone_mode=False)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("converted the 260 pictures") == 1 and "(260 now: 256 in" in out, out[-3000:]  # this process's part

    def shards(folder):
        return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.arrow"))}

    for folder in ("pics-images", "cap"):
        one, two = shards(tmp_path / "one" / folder), shards(tmp_path / "two" / folder)
        assert len(one) == 2 and one == two, folder


def test_a_hub_dataset_offline_is_one_line(tmp_path):
    line = one_line_error(invoke("caption", "--data", "datasets/popyou-tests/no-such-pictures", "--out",
                                 tmp_path / "cap", *TINY))
    assert "not in the local datasets cache" in line and "network access" in line
    assert not (tmp_path / "no-such-pictures-images").exists()


def test_a_hub_dataset_converts_once_and_is_reused_offline(local_hub, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    files = {f"train/p{k}.png": png(k) for k in range(3)}
    files["train/metadata.jsonl"] = "".join(json.dumps({"file_name": f"p{k}.png", "prompt": f"p {k}"}) + "\n"
                                            for k in range(3)).encode()
    local_hub.add_repo("someone/pics", files, repo_type="dataset")
    out = ok(invoke("encode", "--data", "datasets/someone/pics", "--out", tmp_path / "enc", "--workers", 0, *TINY))
    assert "converted the 3 pictures of datasets/someone/pics" in out
    conv = load_stage(tmp_path / "pics-images")
    assert conv["prompt"] == ["p 0", "p 1", "p 2"] and conv["images_error"] == [""] * 3
    go_offline(monkeypatch)
    out = ok(invoke("encode", "--data", "someone/pics", "--out", tmp_path / "enc", "--workers", 0, *TINY))
    assert "unchanged: reused" in out and "nothing to do" in out


def test_what_is_never_replaced(tmp_path):
    pics = tmp_path / "pics"
    make_pictures(pics, 2)
    theirs = tmp_path / "pics-images"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    assert "holds something else" in one_line_error(invoke("caption", "--data", pics, "--out", tmp_path / "cap",
                                                           *TINY))
    assert (theirs / "keep.txt").read_text() == "mine"
    assert "is the folder popyou converts" in one_line_error(invoke("caption", "--data", pics, "--out", theirs, *TINY))
    assert "overlaps input folder" in one_line_error(invoke("caption", "--data", pics, "--out", pics / "cap", *TINY))
    (tmp_path / "empty").mkdir()
    assert "holds no image files" in one_line_error(invoke("caption", "--data", tmp_path / "empty", "--out",
                                                           tmp_path / "x", *TINY))
