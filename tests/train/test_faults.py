"""Fault injection for training: damaged checkpoints, tasks that cannot start, interrupted runs.

Each test reproduces a case of issue 19 against the public API (``Engine``, ``Task``, ``lorafleet train``);
the reference is always the same run left alone.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from helpers.faults import unwritable
from helpers.peft_oracle import rel_diff, write_data
from lorafleet.config import load_config
from lorafleet.lora.adapters import adapter_names
from lorafleet.train.checkpoint import CheckpointMismatchError
from lorafleet.train.engine import Engine
from lorafleet.train.events import StepEvent, StorageFaultEvent
from lorafleet.train.storage import StorageHolds, StorageRetry

STEPS = 4


def _config(
    tmp: Path,
    model_dir: Path,
    names=("a", "b"),
    out: str = "run",
    rank: int = 4,
    file: str = "",
    concurrent: int = 8,
    **task_kw,
) -> Path:
    cfg = {
        "base_model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "output_dir": str(tmp / out),
        "seed": 0,
        "datasets": [],
        "adapters": [],
        "tasks": [],
        "dispatcher": {"max_concurrent_tasks": concurrent, "max_tokens_per_micro_batch": 256},
    }
    for i, name in enumerate(names):
        write_data(tmp / f"{name}.jsonl", i, 6)
        cfg["datasets"].append(
            {"name": name, "path": str(tmp / f"{name}.jsonl"), "format": "prompt_completion"}
        )
        cfg["adapters"].append(
            {"name": name, "rank": rank, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
        )
        task = {"name": name, "adapter": name, "dataset": name, "batch_size": 2, "micro_batch_size": 1}
        task.update(max_steps=STEPS, max_seq_len=64, save_every_steps=1, optimizer={"lr": 1e-2})
        task.update(task_kw)
        cfg["tasks"].append(task)
    path = tmp / (file or f"{out}.yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cfg_path: Path) -> dict:
    return Engine(load_config(cfg_path), tensorboard=False).run()


def _adapter(run: Path, name: str) -> dict:
    return load_file(str(run / "adapters" / name / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir):
    """An uninterrupted run of two tasks, 4 steps each, a checkpoint per step (the newest two kept)."""
    tmp = tmp_path_factory.mktemp("faults_ref")
    states = _train(_config(tmp, tiny_llama_dir))
    assert all(s.status == "succeeded" for s in states.values())
    return tmp / "run"


def _finished_run(reference: Path, tmp_path: Path, model_dir: Path) -> Path:
    """A copy of the reference run's checkpoints (the same config, a new folder), adapters removed."""
    cfg = _config(tmp_path, model_dir)
    shutil.copytree(reference / "checkpoints", tmp_path / "run" / "checkpoints")
    return cfg


@pytest.mark.parametrize("damage", ["safetensors", "state_json"])
def test_truncated_newest_checkpoint_is_skipped(reference, tmp_path, tiny_llama_dir, caplog, damage):
    cfg = _finished_run(reference, tmp_path, tiny_llama_dir)
    newest = tmp_path / "run" / "checkpoints" / "a" / f"step-{STEPS:06d}"
    victim = newest / ("adapter.safetensors" if damage == "safetensors" else "state.json")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="lorafleet.train"):
        states = _train(cfg)
    assert states["a"].status == "succeeded" and states["a"].step == STEPS
    said = caplog.text
    assert str(newest) in said and victim.name in said, said
    assert "truncated" in said
    # resumed from step 3 and redid step 4: the same weights as the run that was never damaged
    for name in ("a", "b"):
        assert rel_diff(_adapter(tmp_path / "run", name), _adapter(reference, name)) <= 1e-6, name
    # the bad folder is set aside, the redone step written anew
    assert (newest.parent / f"step-{STEPS:06d}.corrupt").is_dir()
    assert (newest / "manifest.json").is_file()


def test_every_checkpoint_bad_starts_from_scratch(reference, tmp_path, tiny_llama_dir, caplog):
    cfg = _finished_run(reference, tmp_path, tiny_llama_dir)
    for folder in (tmp_path / "run" / "checkpoints" / "a").glob("step-*"):
        (folder / "optimizer.pt").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="lorafleet.train"):
        states = _train(cfg)
    assert "starts from scratch" in caplog.text
    assert states["a"].status == "succeeded" and states["a"].step == STEPS
    # trained again alone (b is done): other fused batches, so float rounding differs slightly
    assert rel_diff(_adapter(tmp_path / "run", "a"), _adapter(reference, "a")) <= 1e-5


def test_checkpoint_without_manifest_still_resumes(reference, tmp_path, tiny_llama_dir):
    """A checkpoint written before manifests existed is accepted (here: the manifest removed)."""
    cfg = _finished_run(reference, tmp_path, tiny_llama_dir)
    for folder in (tmp_path / "run" / "checkpoints").glob("*/step-*"):
        (folder / "manifest.json").unlink()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "a" / f"step-{STEPS:06d}")  # resume at step 3
    states = _train(cfg)
    assert states["a"].step == STEPS and states["b"].step == STEPS
    assert rel_diff(_adapter(tmp_path / "run", "a"), _adapter(reference, "a")) <= 1e-6


def test_manifest_lists_sizes_and_checksums(reference):
    folder = reference / "checkpoints" / "a" / f"step-{STEPS:06d}"
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert set(files) == {"adapter.safetensors", "optimizer.pt", "state.json"}
    for name, entry in files.items():
        assert entry["size"] == (folder / name).stat().st_size
        assert len(entry["sha256"]) == 64


def _task_args(cfg_path: Path, name: str):
    cfg = load_config(cfg_path)
    ds, ad, task = ({x.name: x for x in xs}[name] for xs in (cfg.datasets, cfg.adapters, cfg.tasks))
    return ds, ad, task


def test_task_that_cannot_resume_leaves_the_engine_at_once(tmp_path, tiny_llama_dir):
    """Issue 19 item 1: resume raises (an incompatible checkpoint) -> no adapter, no registration, no slot."""
    _train(_config(tmp_path, tiny_llama_dir, names=("x",), max_steps=1))  # x's checkpoint at rank 4
    engine = Engine(
        load_config(_config(tmp_path, tiny_llama_dir, names=("b",), concurrent=1)), tensorboard=False
    )
    bad = _config(tmp_path, tiny_llama_dir, names=("x",), rank=8, file="bad.yaml")
    with pytest.raises(CheckpointMismatchError):
        engine.add_task(*_task_args(bad, "x"))
    assert "x" not in engine.states
    assert "x" not in adapter_names(engine.model)
    # the name and the slot are free: the same task, fixed, starts; a second new task runs too
    good = _config(tmp_path, tiny_llama_dir, names=("x", "c"), max_steps=2, file="good.yaml")
    for name in ("x", "c"):
        engine.add_task(*_task_args(good, name))
    with pytest.raises(ValueError, match="a task named 'c' already exists"):
        engine.add_task(*_task_args(good, "c"))
    states = engine.run()
    assert {n: s.status for n, s in states.items()} == {"b": "succeeded", "x": "succeeded", "c": "succeeded"}
    assert states["x"].step == 2 and states["c"].step == 2


# -- storage faults: a checkpoint that cannot be written (issue 19 item 4) ----------------------------------


def _fault_at_step_2_of_a(tmp_path: Path, model_dir: Path, attempts: int, lift_when_b_ends: bool):
    """Train a and b (the reference's config); a's checkpoint folder refuses writes from a's step 2 on, and
    is writable again once b has finished (when ``lift_when_b_ends``). (engine, states, storage faults seen,
    b's steps while a was held)."""
    engine = Engine(load_config(_config(tmp_path, model_dir)), tensorboard=False)
    engine.storage = StorageHolds(StorageRetry(first_s=0.01, max_s=0.04, attempts=attempts))
    folder = tmp_path / "run" / "checkpoints" / "a"
    fault, faults, b_held = ExitStack(), [], []

    def watch(ev) -> None:
        if isinstance(ev, StepEvent) and ev.task == "a" and ev.step == 2:
            fault.enter_context(unwritable(folder))
        elif isinstance(ev, StorageFaultEvent):
            faults.append(ev)
        elif isinstance(ev, StepEvent) and ev.task == "b" and faults:
            b_held.append(ev.step)
            if ev.step == STEPS and lift_when_b_ends:
                fault.close()

    engine.subscribe(watch)
    with fault:
        states = engine.run()
    return engine, states, faults, b_held


def test_a_checkpoint_that_cannot_be_written_holds_the_task_until_the_disk_is_back(
    reference, tmp_path, tiny_llama_dir
):
    _, states, faults, b_held = _fault_at_step_2_of_a(tmp_path, tiny_llama_dir, 1000, True)
    assert {n: (s.status, s.step) for n, s in states.items()} == {
        "a": ("succeeded", 4),
        "b": ("succeeded", 4),
    }
    assert faults and {(f.task, f.step) for f in faults} == {("a", 2)}
    assert [f.failures for f in faults] == list(range(1, len(faults) + 1))
    assert all("/" not in f.reason and f.reason for f in faults), faults
    assert b_held == [3, 4]  # b trained on while a waited
    # a went on from its in-memory state: one record per step, and the weights of the run left alone
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for name in ("a", "b"):
        assert [r["step"] for r in records if r["task"] == name and "loss" in r] == [1, 2, 3, 4], name
        # b ran alone for two steps: other fused batches, so float rounding differs slightly
        assert rel_diff(_adapter(tmp_path / "run", name), _adapter(reference, name)) <= 1e-5, name
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "a").glob("step-*")) == [
        "step-000003",
        "step-000004",
    ]


def test_a_storage_fault_that_lasts_fails_the_task_with_a_reason_and_no_path(
    tmp_path, tiny_llama_dir, caplog
):
    with caplog.at_level(logging.WARNING, logger="lorafleet.train"):
        _, states, faults, _ = _fault_at_step_2_of_a(tmp_path, tiny_llama_dir, 3, False)
    assert (states["a"].status, states["a"].step) == ("failed", 2)
    assert states["b"].status == "succeeded"
    assert len(faults) == 2  # the third failed write is the last: the task fails instead
    error = states["a"].error
    assert "checkpoint at step 2 could not be written after 3 attempts" in error, error
    assert "/" not in error, error
    assert str(tmp_path / "run" / "checkpoints" / "a") in caplog.text  # the operator's log has the path


# Trains the config in argv[1]; with argv[2] == "full", the disk refuses metrics.jsonl's bytes for a while:
# RLIMIT_FSIZE caps every file the process writes at 10 bytes past the records already written (writes past
# it fail with EFBIG, as on a full disk, SIGXFSZ ignored), for two micro-batches, then is lifted.
_METRICS_FAULT = r"""
import json, resource, signal, sys
from pathlib import Path
from lorafleet.config import load_config
from lorafleet.train.engine import Engine

eng = Engine(load_config(sys.argv[1]), tensorboard=False)
metrics = Path(eng.output_dir) / "metrics.jsonl"
seen = {}
if sys.argv[2] == "full":
    while metrics.stat().st_size == 0:
        assert eng.run_once()
    size = metrics.stat().st_size
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, hard))
    while eng.metrics.pending_bytes == 0:
        assert eng.run_once()
    assert eng.run_once()  # one more micro-batch while the disk refuses
    seen = {"pending": eng.metrics.pending_bytes, "grown": metrics.stat().st_size - size,
            "torn": not metrics.read_text().endswith("\n")}
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
states = eng.run()
print(json.dumps({**seen, "states": {n: [s.status, s.step] for n, s in states.items()}}))
"""


def test_a_metrics_file_the_disk_refuses_for_a_while_loses_no_record(tmp_path, tiny_llama_dir):
    runs = {}
    for mode in ("alone", "full"):
        cfg = _config(tmp_path, tiny_llama_dir, out=mode, save_every_steps=100)
        proc = subprocess.run(
            [sys.executable, "-c", _METRICS_FAULT, str(cfg), mode], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[mode] = (json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr)
    (alone, _), (full, log) = runs["alone"], runs["full"]
    assert full["states"] == alone["states"] == {"a": ["succeeded", STEPS], "b": ["succeeded", STEPS]}
    assert full["pending"] > 0 and full["grown"] == 10 and full["torn"]  # a write cut short, kept
    assert "could not write" in log and "File too large" in log and "writable again" in log

    def records(run: str) -> list[tuple]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["task"], r["step"], r.get("kind"), r.get("loss")) for r in map(json.loads, lines)]

    # every record once, in order, no torn line; the training itself untouched (the same losses, bit for bit)
    assert records("full") == records("alone")
    assert len(records("full")) >= 2 * STEPS
    for name in ("a", "b"):  # exactly zero: the same weights, bit for bit
        assert rel_diff(_adapter(tmp_path / "full", name), _adapter(tmp_path / "alone", name)) == 0.0, name
