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


def _stage(name: str, tmp, model_dir, **adapter) -> str:
    cfg = yaml.safe_load((EXAMPLE / f"{name}.yaml").read_text())
    cfg["base_model"] = {"path": str(model_dir)}
    cfg["output_dir"] = str(tmp / name)
    for d in cfg["datasets"]:
        d["path"] = str((EXAMPLE / d["path"]).resolve())
        d["max_examples"] = 8
    cfg["adapters"][0].update(adapter)
    for t in cfg["tasks"]:
        t.update(max_steps=2, batch_size=2, max_seq_len=160)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(path), "--no-progress"]) == 0
    return cfg["adapters"][0]["name"]


@pytest.mark.slow
def test_sft_then_dpo_example(tmp_path, tiny_model_dir):
    sft = _stage("sft", tmp_path, tiny_model_dir)
    assert "init_from" in yaml.safe_load((EXAMPLE / "dpo.yaml").read_text())["adapters"][0]
    _stage("dpo", tmp_path, tiny_model_dir, init_from=str(tmp_path / "sft" / "adapters" / sft))
    recs = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("kind", "train") == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert abs(train[1]["loss"] - math.log(2)) > 1e-5
