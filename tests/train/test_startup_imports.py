"""What ``lorafleet train`` imports, and on which thread: an import list is a behaviour, so it is tested.

Timings are not asserted here (``benchmarks/realistic.py`` measures the time from the command to the first
step and from the last step to the exit); what is tested is that a run imports nothing it does not use, and
that the slow-to-import TensorBoard and matplotlib are imported off the main thread, so they cost the run no
time before its first step or after its last, while the run still writes ``tb/`` and ``loss.png``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Run in a fresh interpreter: record the thread that first imports each top-level module, run the CLI.
_PROBE = r"""
import importlib.abc, json, sys, threading
first = {}
class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        first.setdefault(name, threading.current_thread().name)
        return None
sys.meta_path.insert(0, Probe())
from lorafleet.cli import main
rc = main(["train", sys.argv[1]])
# only what was really imported (a find_spec alone, e.g. "is triton installed?", imports nothing)
print(json.dumps({"rc": rc, "first": {n: t for n, t in first.items() if n in sys.modules}}))
"""

# Never needed by an SFT run from a Hugging Face folder on a CPU. torch._dynamo (which pulls in sympy,
# torch._inductor and triton) is what torch.optim's Optimizer imports on its first add_param_group, zero_grad,
# state_dict or step: lorafleet's own AdamW (train/adamw.py) does not go through it. A one-process run
# needs none of lorafleet.parallel.
_UNUSED = ("transformers", "peft", "trl", "bitsandbytes", "pyarrow", "pandas", "gguf",
           "fastapi", "uvicorn", "sqlalchemy", "torch._dynamo", "torch._inductor",
           "lorafleet.parallel")  # fmt: skip


@pytest.mark.slow
def test_a_train_run_imports_only_what_it_uses_and_plots_off_the_main_thread(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(4)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "base_model": {"path": str(tiny_model_dir)},
        "output_dir": str(tmp_path / "out"),
        "datasets": [{"name": "d", "path": str(tmp_path / "d.jsonl"), "format": "prompt_completion"}],
        "adapters": [{"name": "a", "rank": 2, "dropout": 0.1}],
        "tasks": [{"name": "a", "adapter": "a", "dataset": "d", "batch_size": 2, "max_steps": 2}],
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path / "run.yaml")], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0
    first = report["first"]
    assert "torch" in first and "safetensors" in first  # the probe sees the run's own imports
    for name in _UNUSED:
        assert name not in first, f"{name} was imported by a run that does not use it"
    # TensorBoard and matplotlib are used (tb/ and loss.png), but imported on background threads.
    assert first["tensorboard"] == "lorafleet-tensorboard"
    assert first["matplotlib"] == "lorafleet-plotting"
    out = tmp_path / "out"
    assert any((out / "tb").glob("events.out.tfevents.*")), "TensorBoard wrote no event file"
    assert (out / "loss.png").stat().st_size > 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_tensorboard_scalars_reach_the_event_file(tmp_path):
    """The background writer writes every record it was handed before ``close`` returns."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lorafleet.metrics import MetricsWriter

    w = MetricsWriter(tmp_path, tensorboard=True)
    for step in range(1, 6):
        w.write({"task": "t", "step": step, "loss": 1.0 / step, "tokens": 10 * step, "note": "x"})
    w.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["t/loss", "t/tokens"]
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("t/loss")] == [
        (s, round(1.0 / s, 6)) for s in range(1, 6)
    ]
    assert Path(tmp_path / "metrics.jsonl").read_text().count("\n") == 5
