"""benchmarks/gpu_check.sh is not broken: its CPU dry run (tiny shapes, Triton's interpreter) runs every part.

The numbers of a dry run mean nothing; what is checked is that every part runs to its table, the kernel
checks pass, and the log, JSON and table land in $OUT. The GPU run itself needs a GPU (see the README).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)  # the driver sets it itself for a dry run
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # the script finds the repository itself
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "correctness: 8/8 checks passed" in log and "FAIL" not in log
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and not report["failures"]
    assert [c["ok"] for c in report["checks"]] == [True] * 8
    assert {"base", "fused_triton", "fused_torch"} <= set(report["fused_op"][0]["ms"])
    variants = [row["variant"] for row in report["training"]]
    assert variants[:2] == ["bf16 base", "bf16 base, recompute"]
    assert all(row["tokens_per_s"] > 0 and 0 < row["mfu"] for row in report["training"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| K | base ms |" in table and "| variant | tokens/step |" in table


@pytest.mark.slow
def test_gpu_check_without_a_gpu_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OUT": str(tmp_path)},
    )
    assert done.returncode == 2 and "no CUDA device here" in done.stdout
