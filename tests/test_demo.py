"""``lorafleet demo`` end to end (what ``make demo`` runs): the real bundled SmolLM2 GGUF and chatterbot data,
the demo's own config with every task cut to 2 optimizer steps of a quarter of its batch (the same
micro-batches per step: literature still accumulates two) so that it runs in seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NAMES = ("science", "literature", "money", "movies")


@pytest.mark.slow
def test_demo_trains_four_adapters_and_answers_side_by_side(tmp_path):
    cfg = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())
    cfg["base_model"]["device"] = "cpu"
    for task in cfg["tasks"]:
        task["max_steps"] = 2
        # a quarter of the batch (8 -> 2, micro 8 -> 2, 4 -> 1): the 135M model's steps dominate the run
        assert task["batch_size"] % 4 == 0 and task["micro_batch_size"] % 4 == 0, task
        task["batch_size"] //= 4
        task["micro_batch_size"] //= 4
    for ds in cfg["datasets"]:
        ds["path"] = f"data/{ds['name']}.jsonl"  # relative to the config's folder, as in the demo
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "lorafleet",
        "demo",
        "--config",
        str(tmp_path / "demo.yaml"),
        "--output-dir",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in NAMES:
        assert len((tmp_path / "data" / f"{name}.jsonl").read_text().splitlines()) > 10, name
        assert (out / "adapters" / name / "adapter_config.json").is_file(), name
    assert (out / "loss.png").stat().st_size > 1000
    # one table per category: the base model's answer and each adapter's, from one mixed-adapter batch
    tables = proc.stdout.split("Q (")[1:]
    assert len(tables) == 4, proc.stdout[-3000:]
    for table in tables:
        rows = [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")]
        assert [r for r in rows if r] == ["base", *NAMES], table
