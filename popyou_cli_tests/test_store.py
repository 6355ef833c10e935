"""Tests for popyou_cli.store: sharded atomic writes, resume, rank split, growth, manifest checks,
load_from_disk compatibility, zero-copy joins, column checks and materialize. Small, CPU, offline."""
import os

import datasets
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from popyou_cli.core.errors import PopyouError
from popyou_cli.core.files import ensure_writable_dir
from popyou_cli.store import (StageWriter, check_not_same, load_stage, materialize, read_manifest,
                              require_columns)

GEN_FEATURES = datasets.Features({
    "prompt": datasets.Value("string"),
    "image": datasets.Image(),
    "emb": datasets.Sequence(datasets.Value("float32"), length=4),
    "grid": datasets.Array2D((2, 3), "float32"),
})
CAP_FEATURES = datasets.Features({"caption": datasets.Value("string"), "error": datasets.Value("string")})


def gen_rows(rows):
    """Deterministic gen-data columns for the given row indices."""
    return {
        "prompt": [f"prompt {i}" for i in rows],
        "image": [Image.fromarray(np.full((8, 8, 3), i % 256, dtype=np.uint8)) for i in rows],
        "emb": [np.arange(4, dtype=np.float32) + i for i in rows],
        "grid": [np.full((2, 3), i, dtype=np.float32) for i in rows],
    }


def gen_writer(out, n=10, shard_size=4, seed=0, **kw):
    return StageWriter(out, stage="gen-data", parent=None, settings={"seed": seed, "model": "tiny"},
                       features=GEN_FEATURES, n_rows=n, shard_size=shard_size, **kw)


def run_gen(out, n=10, shard_size=4, **kw):
    w = gen_writer(out, n, shard_size, **kw)
    for spec in w.pending_shards():
        w.write_shard(spec, gen_rows(spec.rows))
    w.finalize()
    return w


def run_caption(inp, out, n=10, shard_size=4):
    w = StageWriter(out, stage="caption", parent=inp, settings={"model": "blip"}, features=CAP_FEATURES,
                    n_rows=n, shard_size=shard_size)
    for spec in w.pending_shards():
        rows = [{"caption": f"a caption {i}", "error": ""} for i in spec.rows]  # list of row dicts
        w.write_shard(spec, rows)
    w.finalize()
    return w


def shard_files(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith("shard-"))


def test_finalize_makes_plain_load_from_disk_work_zero_copy(tmp_path):
    out = tmp_path / "gen"
    w = gen_writer(out)
    # Write out of order: the loaded rows must still come in index order.
    for spec in reversed(w.pending_shards()):
        w.write_shard(spec, gen_rows(spec.rows))
    assert not w.is_complete()
    w.finalize()
    assert w.is_complete()
    ds = datasets.load_from_disk(str(out))
    assert ds.column_names == ["index", "prompt", "image", "emb", "grid"]
    assert ds["index"][:] == list(range(10))
    assert ds[7]["prompt"] == "prompt 7"
    assert ds.features["image"] == datasets.Image() and ds[7]["image"].size == (8, 8)
    assert np.asarray(ds[7]["image"])[0, 0, 0] == 7
    assert ds[7]["emb"] == [7.0, 8.0, 9.0, 10.0]
    assert ds[7]["grid"] == [[7.0] * 3] * 2
    assert pa.types.is_fixed_size_list(ds.data.schema.field("emb").type)
    # load_from_disk memory-maps our shard files themselves: nothing was copied.
    assert sorted(os.path.basename(f["filename"]) for f in ds.cache_files) == shard_files(out)
    manifest = read_manifest(out)
    assert manifest["stage"] == "gen-data" and manifest["n_rows"] == 10 and manifest["settings"]["seed"] == 0


def test_leftover_temp_file_is_ignored_and_redone(tmp_path):
    out = tmp_path / "gen"
    w = gen_writer(out)
    first = w.pending_shards()[0]
    w.write_shard(first, gen_rows(first.rows))
    # A crash mid-write leaves only a hidden temporary file: shard 1 must stay pending.
    (out / ".shard-00001-000000004-000000008.arrow.999.deadbeef.tmp").write_bytes(b"half a shard")
    w2 = gen_writer(out)
    assert [s.shard_id for s in w2.pending_shards()] == [1, 2]
    with pytest.raises(PopyouError, match="not written yet"):
        w2.finalize()
    with pytest.raises(PopyouError, match="unfinished"):
        load_stage(out)
    for spec in w2.pending_shards():
        w2.write_shard(spec, gen_rows(spec.rows))
    w2.finalize()
    assert not any(f.endswith(".tmp") for f in os.listdir(out))
    assert len(load_stage(out)) == 10


def test_crash_mid_write_leaves_no_visible_shard(tmp_path, monkeypatch):
    out = tmp_path / "gen"
    w = gen_writer(out)
    spec = w.pending_shards()[0]
    seen_while_writing = []

    def crash(fd):  # the shard's bytes are written, not yet durable: it must not be visible yet
        seen_while_writing.append((shard_files(out), [f for f in os.listdir(out) if f.endswith(".tmp")]))
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        w.write_shard(spec, gen_rows(spec.rows))
    monkeypatch.undo()
    assert seen_while_writing[0][0] == [] and len(seen_while_writing[0][1]) == 1
    assert shard_files(out) == [] and [s.shard_id for s in w.pending_shards()] == [0, 1, 2]


def test_resume_skips_finished_shards(tmp_path):
    out = tmp_path / "gen"
    w = gen_writer(out)
    for spec in w.pending_shards()[:2]:
        w.write_shard(spec, gen_rows(spec.rows))
    before = {f: os.stat(out / f).st_mtime_ns for f in shard_files(out)}
    again = gen_writer(out).pending_shards()
    assert [(s.shard_id, s.start, s.stop) for s in again] == [(2, 8, 10)]
    run_gen(out)
    assert all(os.stat(out / f).st_mtime_ns == t for f, t in before.items())


def test_rank_split_is_disjoint_covering_and_equals_single_process(tmp_path):
    single = run_gen(tmp_path / "single", n=23, shard_size=3)
    out = tmp_path / "multi"
    main = gen_writer(out, n=23, shard_size=3)  # main process first: it writes the manifest
    workers = [main] + [gen_writer(out, n=23, shard_size=3, main_process=False) for _ in range(2)]
    splits = [w.pending_shards(rank, 3) for rank, w in enumerate(workers)]
    ids = [s.shard_id for split in splits for s in split]
    assert sorted(ids) == list(range(8)) and len(set(ids)) == len(ids)
    # A rank that rescans after another finished a shard still gets only its own shards.
    workers[1].write_shard(splits[1][0], gen_rows(splits[1][0].rows))
    assert [s.shard_id for s in workers[2].pending_shards(2, 3)] == [s.shard_id for s in splits[2]]
    for rank, w in enumerate(workers):
        for spec in w.pending_shards(rank, 3):
            w.write_shard(spec, gen_rows(spec.rows))
    main.finalize()
    a, b = datasets.load_from_disk(str(single.out_dir)), datasets.load_from_disk(str(out))
    assert a.data.table.equals(b.data.table)


def test_growing_n_generates_only_missing_rows(tmp_path):
    out = tmp_path / "gen"
    run_gen(out, n=10)
    kept = {f: os.stat(out / f).st_mtime_ns for f in shard_files(out)[:2]}
    w = gen_writer(out, n=17)
    assert not w.is_complete()
    specs = w.pending_shards()
    assert [(s.shard_id, s.shard_start, s.start, s.stop) for s in specs] == [
        (2, 8, 10, 12), (3, 12, 12, 16), (4, 16, 16, 17)]
    produced = []
    for spec in specs:
        produced += list(spec.rows)
        w.write_shard(spec, gen_rows(spec.rows))
    assert produced == list(range(10, 17))  # rows 8 and 9 were reused, not regenerated
    # Until finalize, readers still see the last finished state (10 rows).
    assert len(datasets.load_from_disk(str(out))) == 10
    w.finalize()
    grown = datasets.load_from_disk(str(out))
    assert all(os.stat(out / f).st_mtime_ns == t for f, t in kept.items())
    reference = run_gen(tmp_path / "ref", n=17)
    assert grown.data.table.equals(datasets.load_from_disk(str(reference.out_dir)).data.table)
    assert len(shard_files(out)) == 5  # the short shard 2 was cleaned up


def test_different_run_refused_unless_overwrite(tmp_path):
    out = tmp_path / "gen"
    run_gen(out)
    files = shard_files(out)
    with pytest.raises(PopyouError) as e:
        gen_writer(out, seed=1)
    assert "different run" in str(e.value) and "seed 1 (folder has 0)" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(PopyouError, match="shard_size"):
        gen_writer(out, shard_size=5)
    with pytest.raises(PopyouError, match="more than"):
        gen_writer(out, n=5)
    assert shard_files(out) == files and read_manifest(out)["settings"]["seed"] == 0
    w = gen_writer(out, seed=1, overwrite=True)
    assert shard_files(out) == [] and len(w.pending_shards()) == 3
    assert read_manifest(out)["settings"]["seed"] == 1


def test_foreign_non_empty_folder_is_never_wiped(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(PopyouError, match="not a popyou"):
            gen_writer(out, overwrite=overwrite)
    assert (out / "thesis.tex").read_text() == "precious"


def test_join_with_parent_sees_all_columns_images_stored_once(tmp_path):
    gen, cap = tmp_path / "gen", tmp_path / "cap"
    run_gen(gen)
    run_caption(gen, cap)
    # The caption folder alone loads with datasets and holds no image data.
    alone = datasets.load_from_disk(str(cap))
    assert alone.column_names == ["index", "caption", "error"]
    cap_bytes = sum(os.path.getsize(cap / f) for f in shard_files(cap))
    gen_bytes = sum(os.path.getsize(gen / f) for f in shard_files(gen))
    assert cap_bytes < gen_bytes / 2
    joined = load_stage(cap)
    assert joined.column_names == ["index", "caption", "error", "prompt", "image", "emb", "grid"]
    assert joined[3]["caption"] == "a caption 3" and joined[3]["prompt"] == "prompt 3"
    assert np.asarray(joined[3]["image"])[0, 0, 0] == 3
    # Zero copy: every block of the joined table is still memory-mapped from its own folder.
    blocks = [b for row in joined.data.blocks for b in row]
    assert all(isinstance(b, datasets.table.MemoryMappedTable) for b in blocks)


def test_join_three_stages_renames_repeated_columns_and_checks_rows(tmp_path):
    gen, cap, enc = tmp_path / "gen", tmp_path / "cap", tmp_path / "enc"
    run_gen(gen, n=12)  # a parent that grew beyond its child contributes its first rows
    run_caption(gen, cap, n=10)
    w = StageWriter(enc, stage="encode", parent=cap, settings={}, n_rows=10, shard_size=10,
                    features=datasets.Features({"codes": datasets.Sequence(datasets.Value("int32"), length=3),
                                                "error": datasets.Value("string")}))
    (spec,) = w.pending_shards()
    w.write_shard(spec, {"codes": np.zeros((10, 3), dtype=np.int32), "error": ["x"] * 10})
    w.finalize()
    joined = load_stage(enc)
    assert len(joined) == 10
    assert joined.column_names == ["index", "codes", "error", "caption", "caption_error", "prompt", "image",
                                   "emb", "grid"]
    assert joined[9]["error"] == "x" and joined[9]["caption_error"] == "" and joined[9]["prompt"] == "prompt 9"
    # A parent with fewer rows than its child is a clear error.
    big = tmp_path / "big"
    run_caption(gen, big, n=12)
    run_gen(gen, n=8, overwrite=True)
    with pytest.raises(PopyouError, match="has 8 rows"):
        load_stage(big)


def test_plain_save_to_disk_root_and_index_mismatch(tmp_path):
    plain, shuffled, cap = tmp_path / "plain", tmp_path / "shuffled", tmp_path / "cap"
    datasets.Dataset.from_dict({"prompt": ["a", "b", "c"]}).save_to_disk(str(plain))
    root = load_stage(plain)
    assert root["index"][:] == [0, 1, 2] and root["prompt"][:] == ["a", "b", "c"]
    datasets.Dataset.from_dict({"index": [2, 1, 0], "prompt": ["c", "b", "a"]}).save_to_disk(str(shuffled))
    run_caption(shuffled, cap, n=3, shard_size=2)
    with pytest.raises(PopyouError, match="index"):
        load_stage(cap)


def test_missing_column_names_the_subcommand(tmp_path):
    gen = tmp_path / "gen"
    run_gen(gen)
    ds = load_stage(gen)
    require_columns(ds, ["prompt", "image"], for_stage="caption")
    with pytest.raises(PopyouError) as e:
        require_columns(ds, ["image", "caption"], for_stage="encode")
    assert str(e.value) == (f"column 'caption' not found in {gen}; it is made by 'popyou caption' "
                            "(needed by 'popyou encode')")
    with pytest.raises(PopyouError, match="'popyou encode'"):
        require_columns(ds, ["siglip_image"], for_stage="train-adapter", path="somewhere")


def test_materialize_round_trip(tmp_path):
    gen, cap, out = tmp_path / "gen", tmp_path / "cap", tmp_path / "flat"
    run_gen(gen)
    run_caption(gen, cap)
    materialize(cap, out)
    flat = datasets.load_from_disk(str(out))
    joined = load_stage(cap)
    assert flat.column_names == joined.column_names
    assert flat.to_dict() == joined.to_dict()
    assert read_manifest(out) is None  # standalone: loads without its parents
    with pytest.raises(PopyouError, match="not empty"):
        materialize(cap, out)
    materialize(cap, out, overwrite=True)
    with pytest.raises(PopyouError, match="overlaps"):
        materialize(cap, gen / "inside")


def test_unwritable_or_overlapping_output_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PopyouError, match="cannot write"):
        ensure_writable_dir(blocker / "out")
    with pytest.raises(PopyouError, match="is a file"):
        gen_writer(blocker)
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(PopyouError, match="cannot write"):
                gen_writer(ro / "gen")
        finally:
            ro.chmod(0o755)
    gen, cap = tmp_path / "gen", tmp_path / "cap"
    run_gen(gen)
    run_caption(gen, cap)
    check_not_same(cap, tmp_path / "elsewhere")
    with pytest.raises(PopyouError, match="overlaps"):  # StageWriter checks its parent itself
        run_caption(gen, gen / "captions")
    with pytest.raises(PopyouError, match="parent"):  # same folder, another parent: a different run
        run_caption(tmp_path / "elsewhere", cap)
    for bad in (cap, gen, gen / "sub", tmp_path):  # the input, its parent, inside one, or above one
        with pytest.raises(PopyouError, match="overlaps"):
            check_not_same(cap, bad)


# ------------------------------------------------------------------------------------------ lineage (issue 12)
def test_content_hashes_are_recorded_at_commit_and_paths_are_relative(tmp_path):
    import hashlib
    import json

    gen, cap = tmp_path / "gen", tmp_path / "cap"
    run_gen(gen)
    run_caption(gen, cap)
    m = read_manifest(gen)
    assert [e["file"] for e in m["shards"]] == shard_files(gen)
    for e in m["shards"]:  # the hash of the committed bytes, and the sidecar written with the shard
        assert e["sha256"] == hashlib.sha256((gen / e["file"]).read_bytes()).hexdigest()
        assert json.loads((gen / f".{e['file']}.sha256").read_text())["sha256"] == e["sha256"]
    c = read_manifest(cap)
    assert c["parent"] == "../gen" and "parent_abs" not in c  # nothing absolute: folders move and upload
    assert c["parent_content"]["digest"] == m["content"]
    assert str(tmp_path) not in (cap / "popyou_stage.json").read_text()


def test_child_follows_a_grown_parent_but_not_a_changed_one(tmp_path):
    gen, cap = tmp_path / "gen", tmp_path / "cap"
    run_gen(gen, n=10)  # shard 2 is short (rows 8, 9)
    run_caption(gen, cap, n=10)
    run_gen(gen, n=17)  # grows: shard 2 extended in place, new shards after it
    assert len(load_stage(cap)) == 10  # the rows the captions were made from are unchanged
    run_caption(gen, cap, n=17)  # and the child grows with it
    assert load_stage(cap)["prompt"][16] == "prompt 16"
    # The same rows made again with other content (another run with --overwrite): refused, naming both folders.
    w = gen_writer(gen, n=17, overwrite=True)
    for spec in w.pending_shards():
        rows = gen_rows(spec.rows)
        rows["prompt"] = [f"other {i}" for i in spec.rows]
        w.write_shard(spec, rows)
    w.finalize()
    with pytest.raises(PopyouError) as e:
        load_stage(cap)
    msg = str(e.value)
    assert f"{cap} was made from another version of {gen}" in msg and "--overwrite" in msg and "\n" not in msg
    with pytest.raises(PopyouError, match="another version"):
        materialize(cap, tmp_path / "flat")
    with pytest.raises(PopyouError, match="another version"):  # continuing the child is refused too
        run_caption(gen, cap, n=17)
    run_gen(gen, n=17, overwrite=True)  # the original content again, byte for byte: the child fits again
    assert load_stage(cap)["caption"][3] == "a caption 3"


def test_missing_or_damaged_shard_is_one_line_and_a_rerun_remakes_exactly_it(tmp_path):
    from popyou_cli.store import verify

    gen = tmp_path / "gen"
    run_gen(gen, n=12)
    names = shard_files(gen)
    original = {n: (gen / n).read_bytes() for n in names}
    (gen / names[1]).unlink()
    with pytest.raises(PopyouError, match=r"rows 4\.\.7 .* is missing; rerun 'popyou gen-data'"):
        load_stage(gen)
    w = gen_writer(gen, n=12)
    assert [s.shard_id for s in w.pending_shards()] == [1]
    # Bit rot: one byte changed in place, the size unchanged. Only verify sees it (cheap checks cannot).
    data = bytearray(original[names[2]])
    data[len(data) // 2] ^= 0xFF
    (gen / names[2]).write_bytes(bytes(data))
    reports = verify(gen)
    assert reports[0].missing == [names[1]] and reports[0].damaged == [names[2]] and reports[0].set_aside
    assert not (gen / names[2]).exists() and (gen / f".{names[2]}.damaged").exists()
    # A shard copied over another one (its rows are wrong): the rerun's cheap checks catch it without verify.
    (gen / names[0]).write_bytes(original[names[1]])
    w = gen_writer(gen, n=12)
    specs = w.pending_shards()
    assert [s.shard_id for s in specs] == [0, 1, 2]
    for spec in specs:
        w.write_shard(spec, gen_rows(spec.rows))
    w.finalize()
    assert {n: (gen / n).read_bytes() for n in names} == original
    assert all(r.ok for r in verify(gen)) and not list(gen.glob(".*.damaged"))


def test_a_run_that_wrote_nothing_does_not_block_a_corrected_one(tmp_path):
    out = tmp_path / "gen"
    gen_writer(out, seed=5).release()  # e.g. the model failed to load: a manifest, no row
    w = gen_writer(out, seed=6)  # the corrected command: no --overwrite needed
    assert read_manifest(out)["settings"]["seed"] == 6 and len(w.pending_shards()) == 3


def test_disk_space_is_checked_before_any_work(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 5000, 5000))
    with pytest.raises(PopyouError, match=r"the 10 rows still to make need up to .* GiB, but .* free"):
        gen_writer(tmp_path / "gen", row_bytes=1000)
    gen_writer(tmp_path / "gen2", row_bytes=100)  # 1000 bytes fit
