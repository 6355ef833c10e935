"""`popyou encode` on the tiny offline preset, in the whole data chain gen-data -> caption -> encode with a corrupt
image injected: stored codes decode to the VQ-VAE's reconstruction, embeddings match the models, a real SIGKILL
of `python -m popyou_cli encode` and a rerun give the uninterrupted result, two processes (torchrun) give it too,
bad input fails in one line, the bench runs. CPU only; the CLI runs in-process except where a process is the point."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from helpers import invoke as run_cli, kill_after_first_shard, one_line_error
from popyou_cli.third_party import encode_images, encode_texts, load_siglip
from popyou_cli.core.images import resize_center_crop, to_pm1
from popyou_cli.models.checkpoints import load_vqvae
from popyou_cli.store import load_stage, read_manifest

REPO = Path(__file__).resolve().parent.parent
N, BAD_ROW = 24, 5
TINY = ["--preset", "tiny", "--device", "cpu", "--no-progress"]
CAPTION = ["--shard-size", "4", "--batch-size", "4", "--workers", "0", *TINY]
ENCODE = ["--shard-size", "2", "--batch-size", "2", "--workers", "0", "--hflip", *TINY]  # 12 shards


def shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.arrow"))}


def corrupt_row(folder: Path, row: int) -> None:
    """Truncate row `row`'s PNG inside its gen-data shard file, as a disk or copy error would."""
    path = next(p for p in folder.glob("shard-*.arrow")
                if int(p.name.split("-")[2]) <= row < int(p.name.split("-")[3].split(".")[0]))
    table = pa.ipc.open_stream(pa.BufferReader(path.read_bytes())).read_all()  # in memory: the file is rewritten
    start = int(path.name.split("-")[2])
    images = table.column("image").to_pylist()
    images[row - start] = {"bytes": images[row - start]["bytes"][:100], "path": None}
    table = table.set_column(table.column_names.index("image"), "image",
                             pa.array(images, type=table.schema.field("image").type))
    with open(path, "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    # Recorded as popyou records a shard it commits: the broken picture is then part of the data as it was made
    # (a generator or source defect), not damage after the fact, which the next stage would refuse to read.
    from popyou_cli.store.lineage import content_digest, hash_file, sidecar

    sha, size = hash_file(path)
    sidecar(folder, path.name).write_text(json.dumps({"sha256": sha, "bytes": size}))
    manifest = json.loads((folder / "popyou_stage.json").read_text())
    for entry in manifest["shards"]:
        if entry["file"] == path.name:
            entry.update(sha256=sha, bytes=size)
    manifest["content"] = content_digest(manifest["shards"])
    (folder / "popyou_stage.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    """gen-data -> (row 5 corrupted) -> caption -> encode, uninterrupted, one process: the reference."""
    root = tmp_path_factory.mktemp("chain")
    paths = {k: root / k for k in ("gen", "cap", "enc")}
    res = run_cli("gen-data", "--n", N, "--out", paths["gen"], "--preset", "tiny", "--image-size", 32, "--shard-size", 4,
                  "--device", "cpu", "--no-progress")
    assert res.exit_code == 0, res.output
    corrupt_row(paths["gen"], BAD_ROW)
    res = run_cli("caption", "--data", paths["gen"], "--out", paths["cap"], *CAPTION)
    assert res.exit_code == 0 and "1 of 24 rows have an error in caption_error" in res.output, res.output
    res = run_cli("encode", "--data", paths["cap"], "--out", paths["enc"], *ENCODE)
    assert res.exit_code == 0, res.output
    assert f"encoded {N} now" in res.output and "1 of 24 rows have an error in encode_error" in res.output
    return paths


def test_columns_manifest_and_the_corrupt_row(chain):
    raw = datasets.load_from_disk(str(chain["enc"]))
    f = raw.features
    assert raw.column_names == ["index", "codes", "codes_flip", "siglip_image", "siglip_text_prompt",
                                "siglip_text_caption", "encode_error"]
    assert f["codes"] == datasets.Sequence(datasets.Value("int16"), length=30) == f["codes_flip"]
    assert f["siglip_image"] == datasets.Sequence(datasets.Value("float16"), length=32) == f["siglip_text_caption"]
    settings = read_manifest(chain["enc"])["settings"]
    assert {k: settings[k] for k in ("patch_nums", "vqvae", "image_size", "resize", "siglip_model",
                                     "siglip_pretrained", "siglip_dim", "text_columns", "flip")} == {
        "patch_nums": [1, 2, 3, 4], "vqvae": "tiny", "image_size": 64, "resize": 72, "siglip_model": "tiny",
        "siglip_pretrained": None, "siglip_dim": 32, "text_columns": ["prompt", "caption"], "flip": True}
    joined = load_stage(chain["enc"])  # encode + caption + gen-data side by side
    assert {"image", "prompt", "caption"} <= set(joined.column_names)
    ds = joined.remove_columns(["image", "attributes"]).with_format("numpy")[:]
    assert ds["index"].tolist() == list(range(N))
    errors = ds["encode_error"].tolist()
    assert "undecodable image" in errors[BAD_ROW] and "empty caption" in errors[BAD_ROW]
    assert errors[:BAD_ROW] + errors[BAD_ROW + 1:] == [""] * (N - 1)
    assert "undecodable image" in ds["caption_error"][BAD_ROW]
    codes = ds["codes"]
    assert (codes[BAD_ROW] == -1).all() and (ds["codes_flip"][BAD_ROW] == -1).all()
    assert not ds["siglip_image"][BAD_ROW].any() and not ds["siglip_text_caption"][BAD_ROW].any()
    assert ds["siglip_text_prompt"][BAD_ROW].any()  # its prompt is fine, so its embedding is kept
    good = np.delete(np.arange(N), BAD_ROW)
    assert (codes[good] >= 0).all() and (codes[good] < 64).all()
    for col in ("siglip_image", "siglip_text_prompt", "siglip_text_caption"):
        norms = np.linalg.norm(ds[col][good].astype(np.float32), axis=1)
        assert np.allclose(norms, 1, atol=2e-3), col


def test_stored_codes_decode_to_the_reconstruction_and_embeddings_match(chain):
    ds = load_stage(chain["enc"])
    vae = load_vqvae("tiny", (1, 2, 3, 4))
    siglip, preprocess, tokenizer = load_siglip("tiny")
    for i in (0, 7, N - 1):
        row = ds[i]
        image = row["image"].convert("RGB")
        x = to_pm1(resize_center_crop(image, 72, 64))[None]
        stored = torch.tensor(row["codes"], dtype=torch.long)[None]
        per_scale = list(torch.split(stored, [pn * pn for pn in (1, 2, 3, 4)], dim=1))
        assert torch.equal(torch.cat(vae.encode_codes(x), 1), stored)
        assert torch.allclose(vae.decode_codes(per_scale), vae.reconstruct(x), atol=1e-6)
        flipped = torch.cat(vae.encode_codes(x.flip(-1)), 1)
        assert torch.equal(flipped, torch.tensor(row["codes_flip"])[None])
        want = encode_images(siglip, preprocess(image)[None])[0]
        assert torch.allclose(torch.tensor(row["siglip_image"]), want, atol=2e-3)
        for col in ("prompt", "caption"):
            want = encode_texts(siglip, tokenizer, [row[col]])[0]
            assert torch.allclose(torch.tensor(row[f"siglip_text_{col}"]), want, atol=2e-3)


def test_sigkill_and_rerun_equal_the_uninterrupted_run(chain, tmp_path):
    out = tmp_path / "killed"
    # paced_cli.py sleeps 0.5 s after each batch: the tiny run is still alive when the kill lands
    cmd = [sys.executable, str(REPO / "popyou_cli_tests" / "paced_cli.py"), "--batch-pause", "0.5", "--", "encode",
           "--data", str(chain["cap"]), "--out", str(out), *ENCODE]
    assert kill_after_first_shard(cmd, out, REPO) == -signal.SIGKILL
    left = shards(out)
    assert 1 <= len(left) < N // 2 and not (out / "state.json").exists()
    res = run_cli("encode", "--data", chain["cap"], "--out", out, *ENCODE)
    assert res.exit_code == 0 and f"encoded {N - 2 * len(left)} now" in res.output, res.output
    assert shards(out) == shards(chain["enc"])  # no lost, repeated or changed row
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no temporary files left
    assert load_stage(out)["index"] == list(range(N))


def test_two_processes_equal_one(chain, tmp_path):
    """caption and encode in one `torchrun --nproc_per_node 2` launch on CPU, through the CLI."""
    script = tmp_path / "both.py"
    cap, enc = tmp_path / "cap", tmp_path / "enc"
    script.write_text(
        "from popyou_cli.cli.app import app\n"
        f"app({['caption', '--data', str(chain['gen']), '--out', str(cap), *CAPTION]!r}, standalone_mode=False)\n"
        f"app({['encode', '--data', str(cap), '--out', str(enc), *ENCODE]!r}, standalone_mode=False)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "captioned 24 now (12 in" in out and "encoded 24 now (12 in" in out, out[-3000:]
    assert out.count("on 2 process(es)") == 2  # the main process reports, the other stays quiet
    assert shards(cap) == shards(chain["cap"]) and shards(enc) == shards(chain["enc"])


def test_options_change_the_columns(chain, tmp_path):
    out = tmp_path / "f32"
    res = run_cli("encode", "--data", chain["cap"], "--out", out, "--text-column", "prompt", "--embed-dtype", "fp32",
                  "--shard-size", 8, "--batch-size", 8, *TINY)
    assert res.exit_code == 0, res.output
    raw = datasets.load_from_disk(str(out))
    assert raw.column_names == ["index", "codes", "siglip_image", "siglip_text_prompt", "encode_error"]
    assert raw.features["siglip_image"] == datasets.Sequence(datasets.Value("float32"), length=32)
    assert raw["codes"] == datasets.load_from_disk(str(chain["enc"]))["codes"]  # batch size does not matter
    s = read_manifest(out)["settings"]
    assert s["text_columns"] == ["prompt"] and s["flip"] is False
    res = run_cli("encode", "--data", chain["cap"], "--out", tmp_path / "none", "--no-text", "--shard-size", 24, *TINY)
    assert res.exit_code == 0 and "no text column" in res.output, res.output


def test_bad_input_is_one_line(chain, tmp_path):
    msg = one_line_error(run_cli("encode", "--data", chain["gen"], "--out", tmp_path / "a", "--text-column", "caption", *TINY))
    assert "column 'caption' not found" in msg and "'popyou caption'" in msg
    assert "overlaps input folder" in one_line_error(run_cli("encode", "--data", chain["cap"], "--out", chain["cap"], *TINY))
    assert "overlaps input folder" in one_line_error(run_cli("encode", "--data", chain["cap"], "--out", chain["gen"], *TINY))
    assert "does not fit --patch-nums" in one_line_error(
        run_cli("encode", "--data", chain["cap"], "--out", tmp_path / "b", "--image-size", 128, "--patch-nums", "1,2,3,4", *TINY))
    assert "give --patch-nums too" in one_line_error(
        run_cli("encode", "--data", chain["cap"], "--out", tmp_path / "b", "--image-size", 128, *TINY))
    assert "smaller than the 64 px crop" in one_line_error(
        run_cli("encode", "--data", chain["cap"], "--out", tmp_path / "c", "--resize", 50, *TINY))
    assert "holds a different run" in one_line_error(
        run_cli("encode", "--data", chain["cap"], "--out", chain["enc"], "--shard-size", 2, *TINY))  # no --hflip
    assert "unknown --embed-dtype" in one_line_error(
        run_cli("encode", "--data", chain["cap"], "--out", tmp_path / "d", "--embed-dtype", "int8", *TINY))


def test_resize_center_crop_matches_torchvision():
    import torchvision.transforms as T

    rng = np.random.default_rng(1)
    for w, h in [(80, 120), (300, 200), (64, 64), (33, 65), (1000, 37), (512, 512)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for resize, crop in [(288, 256), (72, 64)]:
            ref = T.CenterCrop(crop)(T.Resize(resize, interpolation=T.InterpolationMode.LANCZOS)(img))
            ours = resize_center_crop(img, resize, crop)
            assert ours.size == (crop, crop)
            assert np.abs(np.asarray(ref, dtype=int) - np.asarray(ours, dtype=int)).max() <= 2, (w, h, resize)


def test_bench_encode_tiny():
    res = run_cli("bench", "encode", "--n", 8, "--batch-size", 4, "--repeats", 1, "--workers", 0, "--arch", "tiny",
                  "--device", "cpu")
    assert res.exit_code == 0, res.output
    for mode in ("loader only", "models only", "loader + models", "encode stage end to end"):
        assert mode in res.output
