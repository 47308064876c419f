"""A DPO task that starts from a trained adapter (its reference: a frozen copy of it) and a KTO task with a
reference folder, trained by a two-stage pipeline (``--nproc 2``): every stage holds its layers of both
references, and the adapters, losses and held-out evaluations equal the single process's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import make_tiny_model
from lorafleet.cli import main as cli_main
from lorafleet.lora import AdapterSpec, adapter_parameters, add_adapter, save_peft
from lorafleet.models import load_model

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

PROMPTS = ["What is the capital of France?", "Hello world.", "The quick brown fox", "def add(a, b):"]
GOOD = ["The capital of France is Paris.", "hello World.", "jumps over the lazy dog", "return a + b"]
BAD = ["12345 times!", "caf\u00e9, na\u00efve", "they'll see.", "HELLO, it's a tiny tokenizer"]


def test_pipeline_with_references_equals_single_process(tmp_path):
    model_dir = tmp_path / "model"
    make_tiny_model("smollm2", model_dir, num_hidden_layers=4)
    model = load_model(model_dir)
    g = torch.Generator().manual_seed(3)
    for name, rank in (("start", 4), ("other", 2)):
        spec = AdapterSpec(name, rank=rank, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
        add_adapter(model, spec)
        params = adapter_parameters(model, name)
        with torch.no_grad():
            for p in params.values():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        save_peft(tmp_path / name, spec, {k: p.detach() for k, p in params.items()})
    pairs = [
        {"prompt": PROMPTS[i % 4], "chosen": GOOD[i % 4], "rejected": BAD[(i + 1) % 4]} for i in range(4)
    ]
    unpaired = [{"prompt": PROMPTS[i % 4], "completion": (GOOD if i % 2 else BAD)[i % 4], "label": bool(i % 2)}
                for i in range(4)]  # fmt: skip
    for name, rows in (("pairs", pairs), ("unpaired", unpaired)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def config(out):
        cfg = {
            "base_model": {"path": str(model_dir), "device": "cpu"},
            "output_dir": str(out),
            "datasets": [
                {"name": "pairs", "path": str(tmp_path / "pairs.jsonl"), "format": "preference"},
                {"name": "unpaired", "path": str(tmp_path / "unpaired.jsonl"), "format": "unpaired_preference"},
            ],
            "adapters": [
                {"name": "d", "rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"],
                 "init_from": str(tmp_path / "start")},
                {"name": "k", "rank": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["o_proj"]},
            ],
            "tasks": [
                {"name": "d", "type": "dpo", "adapter": "d", "dataset": "pairs", "batch_size": 2, "max_steps": 2,
                 "shuffle": False, "max_seq_len": 48, "optimizer": {"lr": 1e-2},
                 "eval_dataset": "pairs", "eval_every_steps": 1},
                {"name": "k", "type": "kto", "adapter": "k", "dataset": "unpaired", "batch_size": 2, "max_steps": 2,
                 "reference": str(tmp_path / "other"), "shuffle": False, "max_seq_len": 48, "optimizer": {"lr": 1e-2},
                 "eval_dataset": "unpaired", "eval_every_steps": 1},
            ],
            "dispatcher": {"max_tokens_per_micro_batch": 1024},
        }  # fmt: skip
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    assert cli_main(["train", str(config(tmp_path / "single")), "--no-progress"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet", "train", str(config(tmp_path / "p2")), "--nproc", "2", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(out, kind="train", key="loss"):
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {(r["task"], r["step"]): r[key] for r in recs if r.get("kind", "train") == kind}

    one, two = losses(tmp_path / "single"), losses(tmp_path / "p2")
    assert set(one) == set(two) == {(t, s) for t in "dk" for s in (1, 2)}
    assert one[("d", 1)] == pytest.approx(math.log(2), abs=1e-6)
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    # the pipeline's evaluation runs the reference rows under the same frozen references as the engine's
    one, two = losses(tmp_path / "single", "eval", "eval_loss"), losses(tmp_path / "p2", "eval", "eval_loss")
    assert set(one) == set(two) == {(t, s) for t in "dk" for s in (1, 2)}
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    for name in "dk":
        a = load_file(str(tmp_path / "single" / "adapters" / name / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "p2" / "adapters" / name / "adapter_model.safetensors"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
