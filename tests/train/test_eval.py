"""Evaluation: held-out loss per adapter in fused batches, early stopping keeping the best adapter, ``lorafleet eval``.

Oracle: ``transformers`` + PEFT with the adapter folder lorafleet saved, the eval rows tokenized by the HF
tokenizer, one sequence at a time: loss = sum of token cross-entropies over completion tokens / their count.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from lorafleet.cli import main as cli_main

PROMPTS = [
    "What is the capital of France?",
    "Hello world.",
    "The quick brown fox",
    "def add(a, b):",
    "Paris is",
]
ANSWERS = [
    "The capital of France is Paris.",
    "hello World.",
    "jumps over the lazy dog",
    "return a + b",
    "12345",
]
MAX_LEN = 48


def _rows(n: int, shift: int) -> list[dict]:
    return [
        {"prompt": PROMPTS[(i + shift) % 5], "completion": ANSWERS[(2 * i + shift) % 5]} for i in range(n)
    ]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(tmp: Path, model_dir: Path, tasks: dict[str, dict]) -> Path:
    cfg = {
        "base_model": {"path": str(model_dir)},
        "output_dir": str(tmp / "run"),
        "datasets": [],
        "adapters": [],
        "tasks": [],
        "dispatcher": {"max_tokens_per_micro_batch": 512},
    }
    for i, (name, over) in enumerate(tasks.items()):
        cfg["datasets"].append({"name": f"{name}-train", "path": _write(tmp / f"{name}-train.jsonl", _rows(8, i)),
                                "format": "prompt_completion"})  # fmt: skip
        cfg["datasets"].append({"name": f"{name}-eval", "path": _write(tmp / f"{name}-eval.jsonl", _rows(5, i + 2)),
                                "format": "prompt_completion"})  # fmt: skip
        cfg["adapters"].append(
            {"name": name, "rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
        )
        task = {"name": name, "adapter": name, "dataset": f"{name}-train", "eval_dataset": f"{name}-eval",
                "batch_size": 4, "max_steps": 3, "max_seq_len": MAX_LEN, "eval_every_steps": 1,
                "optimizer": {"lr": 2e-2}}  # fmt: skip
        task.update(over)
        cfg["tasks"].append(task)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _hf_eval_loss(model_dir: Path, adapter: Path | None, rows: list[dict]) -> float:
    import transformers as tf
    from peft import PeftModel

    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            p = tok(r["prompt"], add_special_tokens=True)["input_ids"]
            c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids, labels = (p + c)[:MAX_LEN], ([-100] * len(p) + c)[:MAX_LEN]
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            total += float(
                torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
            )
            count += int((target != -100).sum())
    return total / count


def _records(run: Path, kind: str) -> list[dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("kind", "train") == kind]


def test_eval_loss_equals_transformers_peft(tiny_model_dir, tmp_path, monkeypatch, capsys):
    cfg = _config(tmp_path, tiny_model_dir, {"a": {}, "b": {"max_steps": 2, "eval_every_steps": 2}})
    assert cli_main(["train", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    evals = _records(run, "eval")
    assert [(r["task"], r["step"]) for r in evals if r["task"] == "a"] == [("a", 1), ("a", 2), ("a", 3)]
    assert [(r["task"], r["step"]) for r in evals if r["task"] == "b"] == [("b", 2)]
    oracle = {}
    for name in ("a", "b"):
        rows = [json.loads(x) for x in (tmp_path / f"{name}-eval.jsonl").read_text().splitlines()]
        oracle[name] = _hf_eval_loss(tiny_model_dir, run / "adapters" / name, rows)
        last = [r for r in evals if r["task"] == name][-1]
        assert last["eval_loss"] == pytest.approx(oracle[name], rel=1e-5)
        assert last["eval_perplexity"] == pytest.approx(math.exp(oracle[name]), rel=1e-5)
        assert last["eval_examples"] == 5
    base = _hf_eval_loss(
        tiny_model_dir, None, [json.loads(x) for x in (tmp_path / "a-eval.jsonl").read_text().splitlines()]
    )
    assert abs(base - oracle["a"]) > 1e-3, "training must have changed the eval loss"

    monkeypatch.setenv("COLUMNS", "300")
    capsys.readouterr()
    assert cli_main(["eval", str(cfg), "--with-base"]) == 0
    out = capsys.readouterr().out
    for name in ("a", "b"):
        assert f"{oracle[name]:.4f}" in out, out
    assert f"{base:.4f}" in out, out


def test_evaluate_split_into_batches_changes_nothing(tiny_model_dir):
    from lorafleet.data.formats import Example
    from lorafleet.lora import AdapterSpec, adapter_parameters, add_adapter
    from lorafleet.models import load_model
    from lorafleet.train.evaluate import EvalJob, evaluate
    from lorafleet.train.tasks import SFTKind

    model = load_model(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    for name in ("x", "y"):
        add_adapter(model, AdapterSpec(name=name, rank=2, target_modules=("q_proj", "o_proj")))
        for p in adapter_parameters(model, name).values():
            p.data.add_(0.3 * torch.randn(p.shape, generator=g))
    exs = []
    for k in range(6):
        n = 5 + 3 * k
        tokens = tuple(int(t) for t in torch.randint(3, 300, (n,), generator=g))
        exs.append(Example(tokens, (False,) * 3 + (True,) * (n - 3)))
    jobs = [
        EvalJob("x", "x", SFTKind(), exs[:4]),
        EvalJob("y", "y", SFTKind(), exs[2:]),
        EvalJob("base", None, SFTKind(), exs),
    ]
    whole = evaluate(model, jobs, max_tokens=10_000)
    tiny = evaluate(model, jobs, max_tokens=12)  # mostly one example per batch, some alone over the budget
    for name in ("x", "y", "base"):
        assert tiny[name].loss == pytest.approx(whole[name].loss, rel=1e-6)
    assert len({round(r.loss, 6) for r in whole.values()}) == 3


@pytest.mark.slow
def test_early_stopping_keeps_best_adapter(tiny_model_dir, tmp_path):
    # A learning rate far too high: the eval loss soon stops improving.
    over = {"max_steps": 30, "batch_size": 2, "early_stopping_patience": 2, "optimizer": {"lr": 0.3}}
    cfg = _config(tmp_path, tiny_model_dir, {"a": over})
    assert cli_main(["train", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    evals = [(r["step"], r["eval_loss"]) for r in _records(run, "eval")]
    best_step, best = min(evals, key=lambda e: e[1])
    last_step = evals[-1][0]
    assert last_step < 30, "the task must stop early"
    assert last_step == best_step + 2, evals  # patience 2, evaluated every step
    assert max(r["step"] for r in _records(run, "train")) == last_step
    rows = [json.loads(x) for x in (tmp_path / "a-eval.jsonl").read_text().splitlines()]
    assert _hf_eval_loss(tiny_model_dir, run / "adapters" / "a", rows) == pytest.approx(best, rel=1e-5)
    assert _hf_eval_loss(tiny_model_dir, run / "checkpoints" / "a" / "best", rows) == pytest.approx(
        best, rel=1e-5
    )


def test_cli_eval_nothing_to_evaluate(tiny_model_dir, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_model_dir, {"a": {}})
    assert cli_main(["eval", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "no saved adapter" in err and "--adapter" in err
