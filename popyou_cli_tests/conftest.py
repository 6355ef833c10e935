"""Shared test setup: offline, one thread, the golden folder found through POPYOU_GOLDEN_DIR."""
import os

# Set before torch / huggingface are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

HERE = Path(__file__).resolve().parent


def golden_dir() -> Path:
    return Path(os.environ.get("POPYOU_GOLDEN_DIR", HERE.parent.parent / "shared" / "golden")).resolve()


@pytest.fixture(scope="session")
def golden() -> Path:
    var = golden_dir() / "var"
    if not (var / "tiny_cases.safetensors").is_file():
        pytest.skip(f"golden data not found at {var} (set POPYOU_GOLDEN_DIR to the shared/golden folder)")
    return var


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """Runs examples/quickstart.sh once (the whole tiny chain, as a user would, with the installed command);
    tests of sample and eval reuse its pipeline. Returns (work dir, completed process)."""
    import subprocess
    import sys

    work = tmp_path_factory.mktemp("quickstart") / "qs"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "COLUMNS": "200"}
    proc = subprocess.run(["bash", str(HERE.parent / "examples" / "quickstart.sh"), str(work)], env=env,
                          capture_output=True, text=True, timeout=900)
    return work, proc


@pytest.fixture(scope="module")
def work(quickstart):
    """The quick-start's work folder, once its run succeeded: its data, pipelines, samples and report."""
    work, proc = quickstart
    assert proc.returncode == 0, proc.stderr[-2000:]
    return work


@pytest.fixture(scope="module")
def demo_server(quickstart, tmp_path_factory):
    """`popyou demo` on the quick-start's tiny text pipeline, on 127.0.0.1 and a free port, in its own process.
    Yields (url, pipeline folder); the server is stopped when the test module ends, pass or fail."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    work, proc = quickstart
    assert proc.returncode == 0, proc.stderr[-2000:]
    pipe = work / "txt" / "pipeline"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("demo") / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "popyou_cli", "demo", "--pipeline", str(pipe), "--host",
                                   "127.0.0.1", "--port", str(port), "--device", "cpu"], stdout=out,
                                  stderr=subprocess.STDOUT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"popyou demo exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"popyou demo not answering after 300 s:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url, pipe
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    with socket.socket() as s:  # stopped means the port is free again
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"the demo server still answers on port {port}"


@pytest.fixture(scope="module")
def fresh_accelerate_state():
    """accelerate keeps its process state in class attributes: a module that runs stages in-process starts the next
    module from a clean one (`pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")`)."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
