"""`popyou demo` through its API (gradio_client) against a real server on 127.0.0.1 with the tiny pipeline: the image
tab equals `popyou sample`, the beta video decodes with the asked-for frames, bad input leaves the server running,
a long video can be cancelled; plus the MP4 / labelled-strip writers on their own."""
import shlex
import time

import numpy as np
import pytest
from PIL import Image

from helpers import invoke, one_line_error
from popyou_cli.core.errors import PopyouError
from popyou_cli.infer.video import labelled_strip, read_mp4, write_beta_sweep, write_mp4

PROMPT = "a wizard funko pop"
# beta, seed, n, cfg, top-k, top-p, more-smooth: the Image tab's inputs in order
IMAGE_ARGS = dict(beta=1.35, seed="7", n=3, cfg=2.0, top_k=12, top_p=0.9, more_smooth=False)


@pytest.fixture(scope="module")
def client(demo_server, tmp_path_factory):
    from gradio_client import Client

    url, _ = demo_server
    return Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def _image_call(client, prompt=PROMPT, **over):
    a = {**IMAGE_ARGS, **over}
    return client.predict(prompt, a["beta"], a["seed"], a["n"], a["cfg"], a["top_k"], a["top_p"], a["more_smooth"],
                          api_name="/generate")


def _video_call(client, prompt=PROMPT, start=0.0, target=2.5, fps=3, seconds=2, seed="11"):
    return client.submit(prompt, start, target, fps, seconds, seed, 1.5, 16, 0.0, False, api_name="/video")


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_the_readme_api_call_works_on_the_tiny_pipeline(client):
    # README's gradio_client example asks for top-k 900; the tiny vocabulary has 64 codes. Keeping the 900 likeliest
    # keeps all 64: the call works, and its reproduce command says --top-k 64 (the same pixels).
    gallery, _, command = client.predict(PROMPT, 1.0, "7", 1, 1.5, 900, 0.96, False, api_name="/generate")
    args = shlex.split(command)
    assert args[args.index("--top-k") + 1] == "64"
    same, _, _ = client.predict(PROMPT, 1.0, "7", 1, 1.5, 64, 0.96, False, api_name="/generate")
    assert np.array_equal(_pixels(gallery[0]["image"]), _pixels(same[0]["image"]))


def test_image_tab_equals_popyou_sample(client, demo_server, tmp_path):
    gallery, info, command = _image_call(client)
    assert [item["caption"] for item in gallery] == ["seed 7", "seed 8", "seed 9"]
    assert "Seed 7" in info
    args = shlex.split(command)
    assert args[:3] == ["popyou", "sample", PROMPT] and args[-2:] == ["--out", "samples"]
    expected = {"--pipeline": str(demo_server[1].resolve()), "--n": "3", "--seed": "7", "--beta": "1.35",
                "--cfg": "2", "--top-k": "12", "--top-p": "0.9", "--device": "cpu"}
    assert {k: args[args.index(k) + 1] for k in expected} == expected
    assert "--no-more-smooth" in args
    # the command shown under the gallery, run as it is (output folder aside), gives the same pixels
    res = invoke(*args[1:-2], "--out", tmp_path)
    assert res.exit_code == 0, res.output
    for k, item in enumerate(gallery):
        assert np.array_equal(_pixels(item["image"]), _pixels(tmp_path / f"p0000_seed{7 + k}.png")), k
    # beta changes the picture; an empty seed draws a random one and reports it
    other, _, _ = _image_call(client, beta=0.0, n=1)
    assert not np.array_equal(_pixels(other[0]["image"]), _pixels(gallery[0]["image"]))
    random_gallery, random_info, random_cmd = _image_call(client, seed="", n=1)
    drawn = int(shlex.split(random_cmd)[shlex.split(random_cmd).index("--seed") + 1])
    assert random_gallery[0]["caption"] == f"seed {drawn}" and f"Seed {drawn}" in random_info


def test_video_tab_frames_mp4_and_strip(client):
    job = _video_call(client, fps=3, seconds=2)  # 6 frames
    final = job.result(timeout=300)
    updates = job.outputs()
    frame, status, video, strip, command = final
    # frames were shown as they were made: one update per frame (one frame per batch on a CPU), then the result
    assert len(updates) == 6 + 1
    assert [u[1].split(" (")[0] for u in updates[:6]] == [f"frame {i} of 6" for i in range(1, 7)]
    assert "**6 frames**" in status and "seed 11" in status and "capped" not in status
    frames = read_mp4(video)
    assert len(frames) == 6 and frames[0].size == (64, 64)
    below_label = [np.asarray(f).astype(int)[32:] for f in frames]  # the beta label sits in the top-left corner
    assert all(np.abs(below_label[0] - f).mean() > 5 for f in below_label[1:])  # beta changes every frame
    assert Image.open(strip).size == (6 * 64 + 5 * 2, 64)  # one row of six labelled frames, 2 px apart
    assert shlex.split(command)[shlex.split(command).index("--beta-sweep") + 1] == "0:2.5:6"


def test_frame_cap_and_cancel(client):
    job = _video_call(client, fps=30, seconds=20)  # 600 frames asked for: capped at 120
    deadline = time.monotonic() + 120
    while len(job.outputs()) < 2:
        assert not job.done(), job.exception()
        assert time.monotonic() < deadline, "no frame within 120 s"
        time.sleep(0.05)
    status = job.outputs()[-1][1]
    assert "of 120" in status and "asked for 600 frames" in status and "capped at 120" in status
    job.cancel()
    deadline = time.monotonic() + 120
    while not job.done():
        assert time.monotonic() < deadline, "the cancelled video did not stop"
        time.sleep(0.05)
    assert len(job.outputs()) < 120  # stopped part-way: no finished video
    # the device is free again: the next request runs
    gallery, _, _ = _image_call(client, n=1)
    assert len(gallery) == 1


@pytest.mark.parametrize("call, message", [
    (lambda c: _image_call(c, prompt="   "), "type a prompt first"),
    (lambda c: _image_call(c, beta=3.0), "greater than maximum value 2.5"),  # past the slider, via the API
    (lambda c: _image_call(c, beta=-0.5), "less than minimum value 0"),
    (lambda c: _image_call(c, n=50), "greater than maximum value 8"),
    (lambda c: _image_call(c, top_p=1.5), "greater than maximum value 1"),
    (lambda c: _image_call(c, seed="-1"), "seed must be in"),
    (lambda c: _image_call(c, seed="1.5"), "seed must be a whole number"),
    (lambda c: _video_call(c, prompt="").result(timeout=60), "type a prompt first"),
    (lambda c: _video_call(c, fps=10**6).result(timeout=60), "greater than maximum value 30"),
    (lambda c: _video_call(c, seconds=10**9).result(timeout=60), "greater than maximum value 20"),
    (lambda c: _video_call(c, fps=1, seconds=1).result(timeout=60), "a sweep needs at least 2"),
])
def test_bad_input_is_a_message_and_the_server_keeps_running(client, call, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        call(client)
    gallery, _, _ = _image_call(client, n=1)
    assert len(gallery) == 1


def test_cli_refusals_are_one_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the port is checked before the models load (this pipeline does not even exist)
        line = one_line_error(invoke("demo", "--pipeline", tmp_path / "missing", "--port", port))
        assert f"cannot listen on 127.0.0.1:{port}" in line
    assert "--port must be in 1..65_535 (got 0)" in one_line_error(invoke("demo", "--port", 0))
    res = invoke("demo", "--pipeline", "tiny", "--port", port)  # after the loading line, one error line
    assert res.exit_code == 1 and res.output.splitlines()[-1].startswith("error: tiny is a class-conditional")


def test_mp4_and_labelled_strip_writers(tmp_path):
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)) for _ in range(5)]  # odd sizes
    path = write_mp4(frames, 7.5, tmp_path / "sweep.mp4")
    decoded = read_mp4(path)
    assert len(decoded) == 5 and decoded[0].size == (48, 34)  # padded to even sizes for H.264's 4:2:0
    assert list(tmp_path.iterdir()) == [path]  # the temporary file was renamed into place (none left over)
    strip = labelled_strip(frames, [f"beta {b}" for b in range(5)], max_columns=2)
    assert strip.size == (2 * 47 + 2, 3 * 33 + 2 * 2)  # 5 frames wrap into 3 rows of 2
    plain = np.asarray(frames[0])
    assert not np.array_equal(np.asarray(strip)[:33, :47], plain)  # the label is drawn on the frame
    assert np.array_equal(np.asarray(strip)[20:33, :47], plain[20:])  # ... in its top-left corner only
    mp4, sweep_strip = write_beta_sweep(frames, [0, 0.5, 1, 1.5, 2], tmp_path / "beta.mp4", fps=4)
    assert len(read_mp4(mp4)) == 5 and sweep_strip.size == (5 * 47 + 4 * 2, 33)  # one row up to 10 frames
    with pytest.raises(PopyouError, match="one label per frame"):
        labelled_strip(frames, ["beta 0"])
    with pytest.raises(PopyouError, match="frames per second"):
        write_mp4(frames, 0, tmp_path / "zero.mp4")


def test_the_default_demo_is_fast_and_its_header_says_so(demo_server):
    """The server of these tests runs with no speed flag: its header names what --fast picked."""
    import json
    import urllib.request

    url, _ = demo_server
    with urllib.request.urlopen(url + "config", timeout=30) as r:
        config = json.loads(r.read().decode())
    header = [c["props"]["value"] for c in config["components"] if c.get("props", {}).get("elem_id") == "header"]
    assert len(header) == 1 and "--fast" in header[0], header


def test_exact_is_one_switch_away(tmp_path, monkeypatch):
    """The loading line says which mode is being loaded; the tiny class-conditional model then stops the demo."""
    import socket

    monkeypatch.setenv("POPYOU_CACHE", str(tmp_path / "cache"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for flags, mode in (((), "fastest mode (--fast)"), (("--exact",), "dtype auto)"), (("--no-fast",), "dtype auto)"),
                        (("--quantize", "int8"), "dtype auto, --quantize int8)")):
        res = invoke("demo", "--pipeline", "tiny", "--port", port, "--device", "cpu", *flags)
        text = " ".join(res.output.split())
        assert res.exit_code == 1 and f"(device cpu, {mode}" in text, text
        assert res.output.splitlines()[-1].startswith("error: tiny is a class-conditional")
    line = one_line_error(invoke("demo", "--pipeline", "tiny", "--port", port, "--fast", "--dtype", "bf16"))
    assert "--fast picks --dtype and --quantize itself" in line


def test_uploads_past_the_limit_are_refused(demo_server):
    """The page takes no files, but Gradio's upload route answers anyway: past MAX_UPLOAD it refuses (413)."""
    import urllib.error
    import urllib.request

    url, _ = demo_server

    def upload(size: int) -> int:
        body = (b"--popyou\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.bin\"\r\n"
                b"Content-Type: application/octet-stream\r\n\r\n" + b"\0" * size + b"\r\n--popyou--\r\n")
        request = urllib.request.Request(f"{url}gradio_api/upload", data=body,
                                         headers={"Content-Type": "multipart/form-data; boundary=popyou"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert upload(1000) == 200
    assert upload(2 << 20) == 413
