"""Together equals alone with adapter dropout on: keyed masks (``lorafleet.masks``) through ``lorafleet train``.

Oracle: each task trained alone by ``lorafleet train`` with the same config. Five tasks (SFT adapters of
ranks 2, 4 and 8 on different projections, a DPO and an ORPO task; float32, CPU, dropout 0.1, shuffled data
over more than one epoch) trained together must end with each one's weights alone to <= 1e-5 relative, also
with another micro-batch split, and dropout 0.1 must visibly change the weights compared with dropout 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafleet.cli import main as cli_main

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Hello world.",
    "The quick brown fox",
    "def add(a, b):",
    "Paris is",
]
GOOD = ["The capital of France is Paris.", "hello World.", "jumps over the lazy dog", "return a + b", "nice"]
BAD = ["12345 times!", "caf\u00e9, na\u00efve", "they'll see.", "HELLO, it's a tiny tokenizer", "no"]

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# task -> (type, rank, targets, batch size, micro-batch size)
TASKS = {
    "a": ("sft", 2, ["q_proj", "v_proj"], 2, 2),
    "b": ("sft", 8, ALL, 4, 2),
    "c": ("sft", 4, ["o_proj", "down_proj"], 2, 1),
    "d": ("dpo", 4, ["q_proj", "k_proj", "v_proj", "o_proj"], 2, 1),
    "o": ("orpo", 2, ["up_proj", "gate_proj", "q_proj"], 2, 2),
}
STEPS = 3  # 5 rows per dataset: steps cross into the second (reshuffled) epoch
TOL = 1e-5


def _write(tmp: Path) -> None:
    for i in range(3):
        rows = [{"prompt": PROMPTS[(j + i) % 5], "completion": GOOD[(2 * j + i) % 5]} for j in range(5)]
        (tmp / f"sft{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [{"prompt": PROMPTS[j], "chosen": GOOD[j], "rejected": BAD[(j + 2) % 5]} for j in range(5)]
    (tmp / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _train(tmp: Path, model_dir: Path, out: str, names: list[str], dropout: float, **over) -> dict[str, dict]:
    """``lorafleet train`` of tasks ``names``; returns each adapter's saved tensors."""
    cfg = {
        "base_model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "output_dir": str(tmp / out),
        "seed": 3,
        "datasets": [
            *(
                {"name": f"sft{i}", "path": str(tmp / f"sft{i}.jsonl"), "format": "prompt_completion"}
                for i in range(3)
            ),
            {"name": "prefs", "path": str(tmp / "prefs.jsonl"), "format": "preference"},
        ],
        "adapters": [],
        "tasks": [],
        "dispatcher": {"max_concurrent_tasks": 8, "max_tokens_per_micro_batch": over.get("budget", 512)},
    }
    for n in names:
        kind, rank, targets, bs, mbs = TASKS[n]
        adapter = {"name": n, "rank": rank, "alpha": 2 * rank, "dropout": dropout, "target_modules": targets}
        cfg["adapters"].append(adapter)
        dataset = "prefs" if kind != "sft" else f"sft{'abc'.index(n)}"
        label = over.get("rename", {}).get(n, n)
        adapter["name"] = label
        task = {
            "name": label,
            "type": kind,
            "adapter": label,
            "dataset": dataset,
            "batch_size": bs,
            "max_steps": STEPS,
        }
        task.update(micro_batch_size=over.get("micro_batch_size", mbs), max_seq_len=48, shuffle=True)
        if "task_seed" in over:
            task["seed"] = over["task_seed"]
        task["optimizer"] = {"lr": 1e-2}
        cfg["tasks"].append(task)
    path = tmp / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(path), "--no-progress"]) == 0
    labels = {n: over.get("rename", {}).get(n, n) for n in names}
    return {
        n: load_file(str(tmp / out / "adapters" / labels[n] / "adapter_model.safetensors")) for n in names
    }


def _rel(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a) ** 0.5
    return num / sum(float(b[k].double().norm() ** 2) for k in b) ** 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("keyed")
    _write(tmp)
    names = list(TASKS)
    torch.manual_seed(123)  # whatever the process's RNG holds must not matter
    together = _train(tmp, tiny_model_dir, "together", names, 0.1)
    return tmp, tiny_model_dir, together


@pytest.mark.parametrize("name", list(TASKS))
def test_together_equals_alone_with_dropout(runs, name):
    tmp, model_dir, together = runs
    torch.rand(11)  # advance torch's RNG between runs: keyed masks read none
    alone = _train(tmp, model_dir, f"alone-{name}", [name], 0.1)[name]
    assert _rel(together[name], alone) <= TOL, name


def test_another_micro_batch_split_gives_the_same_weights(runs):
    """One example per micro-batch and a 200-token budget: other fused batches, the same weights."""
    tmp, model_dir, together = runs
    split = _train(tmp, model_dir, "split", list(TASKS), 0.1, micro_batch_size=1, budget=200)
    for name in TASKS:
        assert _rel(split[name], together[name]) <= TOL, name


def test_dropout_visibly_changes_the_weights(runs):
    tmp, model_dir, together = runs
    off = _train(tmp, model_dir, "no-dropout", list(TASKS), 0.0)
    for name in TASKS:
        assert _rel(together[name], off[name]) > 100 * TOL, name


def test_a_task_seed_gives_the_same_adapter_under_any_name(runs):
    """tasks[i].seed keys everything random about a task (data order, init, masks), not its name: what a
    service job with a client's seed relies on. Without it, the task's name picks its randomness."""
    tmp, model_dir, _ = runs
    first = _train(tmp, model_dir, "seeded", ["b"], 0.1, task_seed=9)["b"]
    renamed = _train(tmp, model_dir, "seeded-renamed", ["b"], 0.1, task_seed=9, rename={"b": "job-123"})["b"]
    unseeded = _train(tmp, model_dir, "unseeded-renamed", ["b"], 0.1, rename={"b": "job-123"})["b"]
    assert _rel(renamed, first) <= TOL
    assert _rel(unseeded, first) > 100 * TOL
