"""``lorafleet generate`` on bad input: exit code 2, one clear message, no traceback; and a run that works."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_tiny_model
from lorafleet.models import SUPPORTED_ARCHITECTURES


def _run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lorafleet", "generate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _assert_user_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("lorafleet generate: error: "), res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli-tiny")
    make_tiny_model("smollm2", path, seed=3)
    return path


@pytest.mark.slow  # a CLI in a fresh interpreter: over 3 s
def test_missing_path(tmp_path):
    _assert_user_error(_run("--model", str(tmp_path / "no-such-model"), "--prompt", "hi"), "does not exist")


@pytest.mark.slow  # a CLI in a fresh interpreter: over 3 s
def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    _assert_user_error(_run("--model", str(tmp_path), "--prompt", "hi"), "has no config.json")


@pytest.mark.slow
def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    res = _run("--model", str(tmp_path), "--prompt", "hi")
    _assert_user_error(res, "GPT2LMHeadModel", *SUPPORTED_ARCHITECTURES)


@pytest.mark.slow
def test_truncated_safetensors(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _assert_user_error(_run("--model", str(broken), "--prompt", "hi"), "model.safetensors")


@pytest.mark.slow
def test_generate_runs_on_a_tiny_model(tiny_dir):
    res = _run("--model", str(tiny_dir), "--prompt", "Hello", "--prompt", "What is", "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("--- [") == 2
