"""``lorafleet generate`` on bad input: exit code 2, one clear message, no traceback; and a run that works.

Each case is its own ``lorafleet generate`` in a fresh interpreter; the five are independent, so the module
starts them all at once (``runs``) and each test checks its own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from helpers import make_tiny_model
from lorafleet.models import SUPPORTED_ARCHITECTURES

pytestmark = pytest.mark.slow  # CLIs in fresh interpreters: over 3 s each


def _start(*args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lorafleet", "generate", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_user_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("lorafleet generate: error: "), res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Each case's inputs, its process started with the others; name -> its finished process."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    tiny_dir = tmp / "tiny"
    make_tiny_model("smollm2", tiny_dir, seed=3)
    no_config = tmp / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    gpt2 = tmp / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    broken = tmp / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    cases = {
        "missing": ("--model", str(tmp / "no-such-model"), "--prompt", "hi"),
        "no_config": ("--model", str(no_config), "--prompt", "hi"),
        "gpt2": ("--model", str(gpt2), "--prompt", "hi"),
        "broken": ("--model", str(broken), "--prompt", "hi"),
        "tiny": (
            "--model",
            str(tiny_dir),
            "--prompt",
            "Hello",
            "--prompt",
            "What is",
            "--max-new-tokens",
            "4",
        ),
    }
    procs = {name: _start(*args) for name, args in cases.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


def test_missing_path(runs):
    _assert_user_error(runs["missing"], "does not exist")


def test_folder_without_config(runs):
    _assert_user_error(runs["no_config"], "has no config.json")


def test_unsupported_architecture(runs):
    _assert_user_error(runs["gpt2"], "GPT2LMHeadModel", *SUPPORTED_ARCHITECTURES)


def test_truncated_safetensors(runs):
    _assert_user_error(runs["broken"], "model.safetensors")


def test_generate_runs_on_a_tiny_model(runs):
    res = runs["tiny"]
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("--- [") == 2
