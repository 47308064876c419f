"""Sweeps: a task's lists of values expand into one adapter + task per combination; the ranking; the refusal
of more combinations than ``max_concurrent_tasks`` without ``sweep.queue``; and (slow) the bundled example
sweep of 8 combinations on SmolLM2-135M in one process.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from lorafleet.config import ConfigError, load_config, parse_config
from lorafleet.train.sweep import sweep_report

EXAMPLE = REPO / "examples" / "sweep.yaml"


def _base(tmp: Path, **sweep) -> dict:
    for name in ("train", "eval"):
        (tmp / f"{name}.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    return {
        "base_model": {"path": "model"},
        "output_dir": str(tmp / "run"),
        "datasets": [
            {"name": "train", "path": str(tmp / "train.jsonl"), "format": "prompt_completion"},
            {"name": "eval", "path": str(tmp / "eval.jsonl"), "format": "prompt_completion"},
        ],
        "adapters": [
            {"name": "sw", "rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            {"name": "other", "rank": 2},
        ],
        "tasks": [
            {"name": "plain", "adapter": "other", "dataset": "train"},
            {
                "name": "sw",
                "adapter": "sw",
                "dataset": "train",
                "eval_dataset": "eval",
                "optimizer": {"lr": 1e-3, "weight_decay": 0.01},
                "sweep": sweep,
            },
        ],  # fmt: skip
        "dispatcher": {"max_concurrent_tasks": 9},
    }


def test_sweep_expands_into_one_adapter_and_task_per_combination(tmp_path):
    sweep = {"lr": [1e-4, 1e-3], "rank": [4, 16], "alpha": [8.0, 32.0]}
    cfg = parse_config(_base(tmp_path, **sweep))
    assert [t.name for t in cfg.tasks][0] == "plain"
    swept = cfg.tasks[1:]
    assert len(swept) == 8
    adapters = {a.name: a for a in cfg.adapters}
    assert "sw" not in adapters and "other" in adapters
    seen = set()
    for t, (lr, rank, alpha) in zip(swept, itertools.product(*sweep.values())):
        a = adapters[t.adapter]
        assert (t.optimizer.lr, a.rank, a.alpha) == (lr, rank, alpha)
        assert t.optimizer.weight_decay == 0.01 and a.target_modules == [
            "q_proj",
            "v_proj",
        ]  # the rest is kept
        assert t.sweep is None and t.sweep_point.task == "sw"
        assert t.sweep_point.values == {"lr": lr, "rank": rank, "alpha": alpha}
        assert t.adapter == t.name and t.eval_dataset == "eval"
        seen.add(t.name)
    assert len(seen) == 8 and "sw-lr0p001-r16-a32" in seen
    # Expanding again (e.g. a stored job re-validated) changes nothing.
    again = parse_config(cfg.model_dump(mode="json"))
    assert [t.name for t in again.tasks] == [t.name for t in cfg.tasks]


def test_sweep_over_the_concurrency_limit_is_refused_unless_queued(tmp_path):
    data = _base(tmp_path, lr=[1e-4, 1e-3], rank=[4, 16], alpha=[8, 32])
    data["dispatcher"]["max_concurrent_tasks"] = 4
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    line = next(
        i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith("sweep:")
    )
    assert f"{path}:{line}: tasks[1].sweep" in msg
    for part in ("8 combinations", "lr: 2 x rank: 2 x alpha: 2", "makes 9 tasks", "max_concurrent_tasks is 4",
                 "5 of them would wait", "tasks[1].sweep.queue: true"):  # fmt: skip
        assert part in msg, msg
    data["tasks"][1]["sweep"]["queue"] = True
    cfg = parse_config(data)
    assert len(cfg.tasks) == 9


def test_sweep_mistakes(tmp_path):
    bad = _base(tmp_path, lr=[1e-4])
    del bad["tasks"][1]["eval_dataset"]
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.sweep.*eval_dataset"):
        parse_config(bad)
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.sweep\.rank\[1\].*> 0"):
        parse_config(_base(tmp_path, rank=[4, 0]))
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.sweep\.lr.*twice"):
        parse_config(_base(tmp_path, lr=[1e-4, 1e-4]))
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.sweep.*unknown field 'lrs'"):
        parse_config(_base(tmp_path, lrs=[1e-4]))


def test_report_ranks_by_eval_loss_of_the_kept_adapter(tmp_path):
    data = _base(tmp_path, lr=[1e-4, 1e-3])
    data["tasks"][1]["eval_every_steps"] = 1
    data["tasks"][1]["early_stopping_patience"] = 3
    cfg = parse_config(data)
    a, b = (t.name for t in cfg.tasks[1:])
    run = Path(cfg.output_dir)
    run.mkdir()
    recs = [
        *({"task": a, "step": s, "loss": 2.0 / s} for s in (1, 2, 3)),
        *({"task": b, "step": s, "loss": 1.0 / s} for s in (1, 2, 3)),
        {"task": a, "step": 1, "kind": "eval", "eval_loss": 1.5},
        {"task": a, "step": 2, "kind": "eval", "eval_loss": 0.9},  # best, kept by early stopping
        {"task": a, "step": 3, "kind": "eval", "eval_loss": 1.2},
        {"task": b, "step": 3, "kind": "eval", "eval_loss": 1.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rows = sweep_report(cfg, run, print_table=False)["sw"]
    assert [(r["place"], r["task"], r["eval_loss"], r["eval_step"]) for r in rows] == [
        (1, a, 0.9, 2),
        (2, b, 1.0, 3),
    ]
    assert rows[0]["lr"] == 1e-4 and rows[0]["final_train_loss"] == pytest.approx(2.0 / 3)
    assert json.loads((run / "sweep-sw.json").read_text()) == rows
    assert (run / "sweep-sw.png").stat().st_size > 5000


@pytest.mark.slow
def test_example_sweep_of_8_combinations_on_smollm2(tmp_path, smollm2_gguf, capsys, monkeypatch):
    """examples/sweep.yaml, made small (few steps, short sequences, few rows), trained in this process."""
    from lorafleet.cli import main as cli_main

    data = yaml.safe_load(EXAMPLE.read_text())
    for d in data["datasets"]:
        d["path"] = str(EXAMPLE.parent / d["path"])
        d["max_examples"] = 2 if d["name"] == data["tasks"][0]["eval_dataset"] else 4
    data["base_model"]["device"] = "cpu"
    data["output_dir"] = str(tmp_path / "run")
    task = data["tasks"][0]
    task.update(batch_size=1, max_steps=2, eval_every_steps=1, max_seq_len=40)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    assert len(load_config(path).tasks) == 8
    monkeypatch.setenv("COLUMNS", "200")
    assert cli_main(["train", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "8 combinations ranked by eval loss" in out
    rows = json.loads((tmp_path / "run" / "sweep-ai.json").read_text())
    assert [r["place"] for r in rows] == list(range(1, 9))
    losses = [r["eval_loss"] for r in rows]
    assert losses == sorted(losses) and len(set(losses)) == 8
    assert {(r["lr"], r["rank"], r["alpha"]) for r in rows} == set(
        itertools.product([5e-4, 3e-3], [4, 16], [8, 32])
    )
    assert (tmp_path / "run" / "sweep-ai.png").stat().st_size > 5000
    for r in rows:
        assert (tmp_path / "run" / "adapters" / r["task"] / "adapter_model.safetensors").is_file()
