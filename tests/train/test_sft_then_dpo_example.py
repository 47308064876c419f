"""``examples/sft_then_dpo/`` as a user runs it (both stages through ``lorafleet train``), on the tiny model
with the steps cut: the DPO stage starts from the SFT stage's adapter and takes it as its reference, so its
first step's loss is exactly log 2 with zero margin, and it moves after."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from helpers import REPO
from lorafleet.cli import main as cli_main

EXAMPLE = REPO / "examples" / "sft_then_dpo"


def _stage(name: str, tmp, model_dir, evaluate: bool = False, **adapter) -> str:
    cfg = yaml.safe_load((EXAMPLE / f"{name}.yaml").read_text())
    cfg["base_model"] = {"path": str(model_dir)}
    cfg["output_dir"] = str(tmp / name)
    for d in cfg["datasets"]:
        d["path"] = str((EXAMPLE / d["path"]).resolve())
        d["max_examples"] = 8
    cfg["adapters"][0].update(adapter)
    for t in cfg["tasks"]:
        t.update(max_steps=2, batch_size=2, max_seq_len=160)
        if evaluate:  # held out: the training file itself is enough to compare two evaluations
            t["eval_dataset"] = cfg["datasets"][0]["name"]
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(path), "--no-progress"]) == 0
    return path


@pytest.mark.slow
def test_sft_then_dpo_example(tmp_path, tiny_model_dir):
    _stage("sft", tmp_path, tiny_model_dir)
    assert "init_from" in yaml.safe_load((EXAMPLE / "dpo.yaml").read_text())["adapters"][0]
    dpo = _stage(
        "dpo", tmp_path, tiny_model_dir, evaluate=True, init_from=str(tmp_path / "sft" / "adapters" / "ai")
    )
    recs = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("kind", "train") == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert abs(train[1]["loss"] - math.log(2)) > 1e-5
    # lorafleet eval on the saved adapter uses the same reference (the SFT adapter): the same eval loss
    (evaluation,) = [r for r in recs if r.get("kind") == "eval"]
    from lorafleet.config import load_config
    from lorafleet.data.formats import load_examples
    from lorafleet.lora import load_peft
    from lorafleet.models import load_model
    from lorafleet.models.tokenizer import load_tokenizer
    from lorafleet.train.evaluate import EvalJob, evaluate
    from lorafleet.train.reference import attach_reference
    from lorafleet.train.tasks import task_kind

    assert cli_main(["eval", str(dpo)]) == 0
    cfg = load_config(dpo)
    task, adapter = cfg.tasks[0], cfg.adapters[0]
    model = load_model(tiny_model_dir)
    load_peft(model, tmp_path / "dpo" / "adapters" / adapter.name, adapter.name)
    ref = attach_reference(model, task, adapter, adapter.name)
    assert ref is not None
    held = load_examples(cfg.datasets[0], load_tokenizer(tiny_model_dir), task.max_seq_len)
    again = evaluate(model, [EvalJob(task.name, adapter.name, task_kind(task), held, ref)], 4096)[task.name]
    assert again.loss == pytest.approx(evaluation["eval_loss"], rel=1e-5)
