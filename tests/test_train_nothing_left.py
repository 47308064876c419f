"""A second ``lorafleet train`` on finished checkpoints says that it resumed finished work and trained nothing,
with each finished task's last figures (final loss, tokens/s) as the run that trained it printed them;
a task added to the config meanwhile trains and the finished ones are named."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from lorafleet.cli import main


def _rows(out: str) -> dict[str, list[str]]:
    """The summary table's rows by task: [status, steps, final loss, tokens, tokens/s]."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if len(cells) == 6 and cells[0] not in ("task", ""):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_second_train_on_finished_checkpoints_says_nothing_was_left(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("COLUMNS", "200")
    rows = [{"prompt": f"Question number {i}?", "completion": f" Answer {i}."} for i in range(8)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def task(name: str, steps: int) -> dict:
        return {"name": name, "adapter": name, "dataset": "d", "batch_size": 2, "max_steps": steps}

    cfg = {
        "base_model": {"path": str(tiny_model_dir)},
        "output_dir": str(tmp_path / "run"),
        "datasets": [{"name": "d", "path": str(tmp_path / "d.jsonl"), "format": "prompt_completion"}],
        "adapters": [{"name": n, "rank": 2, "alpha": 4} for n in ("a", "b", "c")],
        "tasks": [task("a", 3), task("b", 2)],
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    first = capsys.readouterr().out
    assert "Nothing left" not in first and "earlier run" not in first
    assert main(["train", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    second = capsys.readouterr().out
    before, after = _rows(first), _rows(second)
    assert set(before) == set(after) == {"a", "b"}
    for name in ("a", "b"):
        assert before[name][0] == "succeeded" and after[name][0] == "done earlier", (before, after)
        assert after[name][1:] == before[name][1:]  # steps, final loss, tokens, tokens/s: that run's figures
        assert re.fullmatch(r"\d+\.\d{4}", after[name][2]) and after[name][4] != "-", after
    text = " ".join(second.split())
    assert "Nothing left to train: every task had already finished in an earlier run" in text, second
    assert "trained no step" in text and str(tmp_path / "run" / "checkpoints") in re.sub(r"\s+", "", second)
    assert "To train again, delete" in text
    # a task added meanwhile trains; the finished ones are named
    cfg["tasks"].append(task("c", 2))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    third = capsys.readouterr().out
    rows3 = _rows(third)
    assert rows3["c"][0] == "succeeded" and rows3["a"][0] == rows3["b"][0] == "done earlier", rows3
    text = " ".join(third.split())
    assert "Nothing left to train" not in text
    assert (
        "Already finished in an earlier run (resumed from the final checkpoint, nothing left to train): a, b."
        in text
    )
