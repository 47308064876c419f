"""Per-task checkpoints, written atomically, and exact resume.

Layout: ``OUTPUT_DIR/checkpoints/<task>/step-000012/`` holding

- ``adapter.safetensors``: the adapter's trainable tensors under their PEFT keys;
- ``optimizer.pt``: optimizer and scheduler state;
- ``state.json``: step, examples consumed, loss history and fingerprint of what must not change on resume
  (no RNG state: dropout masks are keyed, ``lorafleet.masks``).

A checkpoint is written into ``step-N.tmp`` and renamed into place, so a crash never leaves a half-written
``step-N``. The newest ``keep_last`` checkpoints are kept, plus ``best`` when early stopping asks for it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointMismatchError",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "saved_steps",
]


class CheckpointMismatchError(ValueError):
    """The output folder holds checkpoints of another, incompatible run."""


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def save_checkpoint(
    root: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write ``root/step-N`` atomically and prune older ones; returns the folder."""
    root.mkdir(parents=True, exist_ok=True)
    final = _step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "adapter.safetensors")
    )
    torch.save(optim_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
    for f in tmp.iterdir():  # durable before it becomes visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    # only complete checkpoints count: a damaged folder must never push out the last good one
    steps = saved_steps(root)
    for old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(_step_dir(root, old), ignore_errors=True)
    return final


def saved_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if not p.name.endswith(".tmp") and (p / "state.json").is_file()]
    return sorted(int(p.name.removeprefix("step-")) for p in done)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder under ``root``, or None."""
    steps = saved_steps(root)
    return _step_dir(root, steps[-1]) if steps else None


def load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, optimizer state, state dict); refuses a checkpoint whose fingerprint differs."""
    state = json.loads((path / "state.json").read_text())
    theirs = state.get("fingerprint", {})
    diffs = [k for k in sorted(set(theirs) | set(fingerprint)) if theirs.get(k) != fingerprint.get(k)]
    if diffs:
        detail = "; ".join(
            f"{k}: checkpoint has {theirs.get(k)!r}, config has {fingerprint.get(k)!r}" for k in diffs
        )
        raise CheckpointMismatchError(
            f"{path} belongs to another, incompatible run ({detail}). Use a new output_dir, or delete "
            f"{path.parent} to start this task from scratch."
        )
    tensors = load_file(str(path / "adapter.safetensors"))
    optim = torch.load(path / "optimizer.pt", weights_only=False)
    return tensors, optim, state
