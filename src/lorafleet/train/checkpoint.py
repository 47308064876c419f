"""Per-task checkpoints, written atomically, and exact resume.

Layout: ``OUTPUT_DIR/checkpoints/<task>/step-000012/`` holding

- ``adapter.safetensors``: the adapter's trainable tensors under their PEFT keys;
- ``optimizer.pt``: optimizer and scheduler state;
- ``state.json``: step, examples consumed, loss history and fingerprint of what must not change on resume
  (no RNG state: dropout masks are keyed, ``lorafleet.masks``).

- ``manifest.json``: every other file's size and sha256, written (and synced) last.

A checkpoint is written into ``step-N.tmp`` and renamed into place, so a crash never leaves a half-written
``step-N``. The newest ``keep_last`` checkpoints are kept, plus ``best`` when early stopping asks for it.

A checkpoint can still go bad after it was written (a disk that loses the tail of a file, a copy that was cut
short): ``check_checkpoint`` compares the files with the manifest, and ``saved_steps`` / ``latest_checkpoint``
only count the checkpoints that pass; ``load_checkpoint`` turns any unreadable file into a
``CorruptCheckpointError`` that names the folder. Checkpoints written before manifests existed have none: they
are accepted when their files are present and readable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "MANIFEST",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "SkippedCheckpoint",
    "check_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "saved_steps",
    "scan_checkpoints",
    "set_aside",
]

MANIFEST = "manifest.json"
_FILES = ("adapter.safetensors", "optimizer.pt", "state.json")


class CheckpointMismatchError(ValueError):
    """The output folder holds checkpoints of another, incompatible run."""


class CorruptCheckpointError(ValueError):
    """A checkpoint folder's files are missing, truncated or do not match its manifest."""


@dataclass(frozen=True)
class SkippedCheckpoint:
    """A checkpoint that resume passed over: its folder, its step and why."""

    path: Path
    step: int
    reason: str

    def message(self) -> str:
        return f"skipped checkpoint {self.path}: {self.reason}"


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
    for f in tmp.iterdir():  # durable before the manifest vouches for them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    files = {name: {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in _FILES}
    with open(tmp / MANIFEST, "w") as fh:  # last: a folder without it was never finished (or predates it)
        fh.write(json.dumps({"version": 1, "step": step, "files": files}))
        fh.flush()
        os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    # only intact checkpoints count: a damaged folder must never push out the last good one
    steps = saved_steps(root)
    for old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(_step_dir(root, old), ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_checkpoint(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` is not intact, or None when it is.

    With a manifest: every file it lists exists with its size and sha256. Without one (a checkpoint from
    before manifests): its three files exist and ``state.json`` parses; the tensors are checked on load.
    """
    manifest = path / MANIFEST
    if not manifest.is_file():
        missing = [f for f in _FILES if not (path / f).is_file()]
        if missing:
            return f"{', '.join(missing)} missing (and no {MANIFEST})"
        try:
            json.loads((path / "state.json").read_text())
        except (OSError, ValueError) as e:
            return f"state.json is unreadable ({e}); truncated?"
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for name, want in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{name} is {size} bytes, the manifest says {want['size']} (truncated or overwritten)"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = []
    for p in root.glob("step-*"):
        num = p.name.removeprefix("step-")
        if p.is_dir() and num.isdigit():  # not step-N.tmp (unfinished) nor step-N.corrupt (set aside)
            out.append((int(num), p))
    return sorted(out)


def scan_checkpoints(root: Path) -> tuple[list[int], list[SkippedCheckpoint]]:
    """(steps of the intact checkpoints under ``root``, oldest first; the ones that are not, and why)."""
    good, bad = [], []
    for step, p in _step_folders(root):
        reason = check_checkpoint(p)
        if reason is None:
            good.append(step)
        else:
            bad.append(SkippedCheckpoint(p, step, reason))
    return good, bad


def set_aside(skipped: SkippedCheckpoint) -> None:
    """Rename a bad checkpoint to ``step-N.corrupt`` (kept for inspection, out of resume and pruning)."""
    target = skipped.path.with_name(skipped.path.name + ".corrupt")
    try:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(skipped.path, target)
    except OSError:  # a read-only folder: it stays, and is skipped again next time
        pass


def saved_steps(root: Path) -> list[int]:
    """Steps of the intact checkpoints under ``root`` (``check_checkpoint``), oldest first."""
    return scan_checkpoints(root)[0]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest intact checkpoint folder under ``root``, or None."""
    steps = saved_steps(root)
    return _step_dir(root, steps[-1]) if steps else None


def load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, optimizer state, state dict); refuses a checkpoint whose fingerprint differs.

    Raises ``CorruptCheckpointError`` (naming ``path``) when a file cannot be read, and
    ``CheckpointMismatchError`` when the checkpoint belongs to another run.
    """
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"checkpoint {path}: state.json is unreadable ({e}); truncated?") from e
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
    try:
        tensors = load_file(str(path / "adapter.safetensors"))
    except Exception as e:  # safetensors raises its own error types for a cut-short file
        raise CorruptCheckpointError(f"checkpoint {path}: adapter.safetensors is unreadable ({e})") from e
    try:
        optim = torch.load(path / "optimizer.pt", weights_only=False)
    except Exception as e:  # pickle/zip errors of a damaged file
        raise CorruptCheckpointError(f"checkpoint {path}: optimizer.pt is unreadable ({e})") from e
    return tensors, optim, state
