"""benchmarks/realistic.py end to end in --smoke mode (the tiny model, one step): no performance assertion.

It checks what the README's headline table rests on: every contender trains the same real tokens (the same
first-step losses: the adapters start with B = 0, so each is the base model's loss on the same examples,
computed by lorafleet and independently by transformers + PEFT), lorafleet's startup and shutdown are dated
from its own metrics, and the bfloat16 run is compared with lorafleet's own float32 run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_realistic_smoke_run_reports_every_contender_on_the_same_tokens(tmp_path):
    out = tmp_path / "realistic"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "realistic.py"), "--smoke", "--bf16", "--threads", "1"]
    cmd += ["--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    w = report["workloads"]["issue"]
    s = w["summary"]
    expected = {"lorafleet", "lorafleet_bf16", "peft_padded", "peft_packed"}
    assert expected <= set(report["contenders"]) <= expected | {"mlora"}
    ours = s["lorafleet"]["first_losses"]
    assert len(ours) == 4
    for c in report["contenders"]:
        assert s[c]["first_losses"] == pytest.approx(ours, rel=1e-4), c
        assert s[c]["loop_s"]["median"] > 0 and s[c]["whole_s"]["median"] > s[c]["loop_s"]["median"]
    # padded PEFT computes its padding; packed PEFT and lorafleet compute exactly the real tokens
    assert s["peft_padded"]["processed_tokens"] > w["tokens"] == s["peft_packed"]["processed_tokens"]
    lf = s["lorafleet"]
    run = w["runs"][0]["lorafleet"]
    assert 0 < lf["to_first_step_s"]["median"] < run["whole_s"]
    assert 0 <= lf["after_last_step_s"]["median"] < run["whole_s"]
    assert run["to_first_step_s"] + run["loop_s"] + run["after_last_step_s"] == pytest.approx(run["whole_s"])
    assert sorted(run["losses"]) == [f"adapter{i}" for i in range(4)]
    b = s["lorafleet_bf16"]
    assert 0 < b["loss_deviation"]["median"] < 1e-2  # bfloat16 rounding, not a different computation
    assert b["speedup_over_float32_loop_s"]["median"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| peft_packed |" in md and "bfloat16 base" in md and "command to first step" in md
