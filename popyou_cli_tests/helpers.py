"""Helpers shared by the test files: running the CLI in-process, the one-line error form, a real SIGKILL."""
import os
import signal
import subprocess
import time
from pathlib import Path

from typer.testing import CliRunner

from popyou_cli.cli import app


def invoke(*args):
    """`popyou ARGS` in this process (importing the stack once per test session, not per call)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(res, exit_code: int | None = 1) -> str:
    """Asserts the user-error form: exit status `exit_code` (None: any failure) and one line starting 'error:'."""
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert (res.exit_code != 0) if exit_code is None else (res.exit_code == exit_code), res.output
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


def kill_after_first_shard(cmd: list[str], out: Path, cwd: Path, env: dict | None = None) -> int:
    """Starts `cmd`, SIGKILLs it as soon as a finished shard file appears in `out`, returns its exit status."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("shard-*.arrow")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no shard written within 120 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return proc.returncode
