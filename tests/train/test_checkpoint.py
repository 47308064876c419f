"""Per-task checkpoints: atomic layout, pruning, the newest complete one, and the fingerprint check."""

from __future__ import annotations

import json

import pytest
import torch

from lorafleet.train.checkpoint import (
    CheckpointMismatchError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    saved_steps,
)

FP = {"adapter": ["a", "lora", 4, 8.0, False, ["q_proj"]], "seed": 0}


def _save(root, step, value=1.0, keep_last=2):
    tensors = {"w": torch.full((2, 3), value)}
    optim = {"optimizer": {"state": {0: {"step": step}}}, "scheduler": {"last_epoch": step}}
    return save_checkpoint(root, step, tensors, optim, {"fingerprint": FP, "tokens": 10 * step}, keep_last)


def test_roundtrip_layout_and_pruning(tmp_path):
    root = tmp_path / "checkpoints" / "a"
    assert latest_checkpoint(root) is None and saved_steps(root) == []
    for step in (1, 2, 3):
        path = _save(root, step, value=float(step))
    assert path == root / "step-000003"
    names = ["adapter.safetensors", "manifest.json", "optimizer.pt", "state.json"]
    assert sorted(p.name for p in path.iterdir()) == names
    assert saved_steps(root) == [2, 3]  # keep_last=2 pruned step 1
    assert latest_checkpoint(root) == path
    tensors, optim, state = load_checkpoint(path, FP)
    torch.testing.assert_close(tensors["w"], torch.full((2, 3), 3.0))
    assert optim["scheduler"]["last_epoch"] == 3
    assert state["step"] == 3 and state["tokens"] == 30
    assert "torch_rng" not in state  # masks are keyed: no global RNG state travels with a checkpoint


def test_a_leftover_temporary_folder_is_never_taken_for_a_checkpoint(tmp_path):
    root = tmp_path / "a"
    _save(root, 2)
    (root / "step-000004.tmp").mkdir()  # a crash mid-write
    (root / "step-000004.tmp" / "state.json").write_text("{")
    (root / "step-000005").mkdir()  # no state.json: not complete
    assert saved_steps(root) == [2]
    assert latest_checkpoint(root) == root / "step-000002"
    _save(root, 4)  # the same step written again replaces the leftover
    assert saved_steps(root) == [2, 4] and not (root / "step-000004.tmp").exists()


def test_an_incompatible_run_is_refused_with_the_differences(tmp_path):
    path = _save(tmp_path / "a", 1)
    other = {**FP, "seed": 1}
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(path, other)
    assert "seed: checkpoint has 0, config has 1" in str(e.value)
    assert "Use a new output_dir, or delete" in str(e.value)
    assert json.loads((path / "state.json").read_text())["fingerprint"] == FP
