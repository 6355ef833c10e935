"""The code has no unused imports, undefined names or syntax errors (ruff's pyflakes rules, pinned in the test
extras so every machine checks the same): a mistake a reviewer should never have to find by eye."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyflakes_rules_pass():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a test dependency: pip install -e '.[test]'"
    proc = subprocess.run([ruff, "check", "--no-cache", "--select", "F,E9", "--output-format", "concise",
                           "popyou_cli", "popyou_cli_tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
