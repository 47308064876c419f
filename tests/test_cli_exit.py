"""``lorafleet`` (``cli.entry``) ends with ``os._exit`` after ``main``: its exit code, output and ``atexit``
handlers must survive that, as a normal exit would keep them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _entry(argv: list[str]) -> subprocess.CompletedProcess:
    code = (
        "import atexit, sys; atexit.register(lambda: print('atexit ran', flush=True)); "
        f"sys.argv = ['lorafleet', *{argv!r}]; print('before', end=''); "
        "from lorafleet.cli import entry; entry()"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=SRC)


def test_entry_keeps_the_exit_code_unflushed_output_and_atexit_handlers(tmp_path):
    missing = tmp_path / "missing.yaml"
    proc = _entry(["train", str(missing)])
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.startswith("before")  # written without a newline, flushed before os._exit
    assert "atexit ran" in proc.stdout
    assert "missing.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_python_dash_m_lorafleet_returns_the_commands_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet", "train", str(tmp_path / "missing.yaml")],
        capture_output=True, text=True, timeout=120, cwd=SRC,
    )  # fmt: skip
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr
