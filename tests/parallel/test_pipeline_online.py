"""The pipeline as an online trainer through its Python API (``examples/pipeline_online.py`` under torchrun,
2 stages over gloo): three tasks train, a fourth is added while they do; every adapter, step loss and
evaluation equals the single-process engine's (the oracle of ``test_pipeline.py``, dropout 0.1), and the
coordinator's typed events come out in order, as from the engine: per task ``queued``, ``running``, one
step event per step in order, each checkpoint after its step, ``succeeded`` last."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from test_pipeline import TASKS, _env, _records, setup  # noqa: F401  (setup: the module's fixture)

from helpers import REPO
from helpers.peft_oracle import rel_diff

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_task_added_through_the_python_api_while_others_train_equals_single_process(setup):  # noqa: F811
    tmp, write_config, reference = setup
    out = tmp / "online"
    cfg = write_config(tmp / "online.yaml", out, max_in_flight=3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "examples" / "pipeline_online.py"), str(cfg), "--late", "b", "--after-steps", "2"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "adding ['b'] while ['a', 'c', 'd'] train" in proc.stdout, proc.stdout[-2000:]
    for name in TASKS:
        got = load_file(str(out / "adapters" / name / "adapter_model.safetensors"))
        assert rel_diff(got, reference[name]) <= 1e-5, name
    records, want = _records(out), reference["metrics"]
    assert set(records) == set(want)
    for key, r in want.items():
        for field in ("loss", "eval_loss", "grad_norm"):
            if field in r:
                assert abs(records[key][field] - r[field]) <= 1e-5 * max(1.0, abs(r[field])), (key, field)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    # b was added while the others trained: after another task's second step
    first_b = next(i for i, e in enumerate(events) if e["task"] == "b")
    assert any(e["event"] == "StepEvent" and e["step"] >= 2 for e in events[:first_b])
    for name in TASKS:
        mine = [e for e in events if e["task"] == name]
        statuses = [e["status"] for e in mine if e["event"] == "StatusEvent"]
        assert statuses == ["queued", "running", "succeeded"], (name, statuses)
        assert mine[0]["event"] == "StatusEvent" and mine[-1] == {**mine[-1], "status": "succeeded"}
        steps = [e["step"] for e in mine if e["event"] == "StepEvent"]
        assert steps == sorted(k[1] for k in want if k[0] == name and k[2] == "step"), (name, steps)
        stepped = set()
        for e in mine:
            if e["event"] == "StepEvent":
                stepped.add(e["step"])
            elif e["event"] == "CheckpointEvent":
                assert e["step"] in stepped, (name, e)  # a checkpoint comes after its step
        assert [e["step"] for e in mine if e["event"] == "CheckpointEvent"][-1] == steps[-1]
