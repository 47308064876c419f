"""The training engine against an independent oracle: each adapter trained alone by HF PEFT + torch AdamW.

Also: exact resume after SIGKILL, a diverging task failing alone, and clear CLI errors for bad input.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import make_tiny_model
from helpers.peft_oracle import STEPS, TASKS, engine_config, peft_alone, peft_init, rel_diff
from lorafleet.cli import main as cli_main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    model_dir = tmp / "model"
    make_tiny_model("llama2", model_dir)
    for i, (name, (rank, alpha, targets, *_rest)) in enumerate(TASKS.items()):
        peft_init(model_dir, tmp / "init", name, rank, alpha, targets, TASKS[name][7], seed=10 + i)
    return tmp, model_dir


def test_together_equals_peft_alone(setup):
    tmp, model_dir = setup
    cfg = engine_config(tmp, model_dir, TASKS)
    assert cli_main(["train", str(cfg), "--no-progress"]) == 0
    for i, (name, spec) in enumerate(TASKS.items()):
        ours = load_file(str(tmp / "run" / "adapters" / name / "adapter_model.safetensors"))
        ref = peft_alone(model_dir, tmp, name, spec, i)
        init = load_file(str(tmp / "init" / name / "adapter_model.safetensors"))
        assert rel_diff(ours, init) > 1e-3, "training must have moved the weights"
        assert rel_diff(ours, ref) <= 1e-5, name
    records = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {(r["task"], r["step"]) for r in records} == {(n, s) for n in TASKS for s in range(1, STEPS + 1)}
    for r in records:
        assert {"task", "step", "loss", "lr", "tokens", "elapsed_s"} <= set(r)
    assert (tmp / "run" / "loss.png").stat().st_size > 1000


def _run_cli(cfg: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lorafleet", "train", str(cfg), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(setup, tmp_path):
    _, model_dir = setup
    tasks = {k: (*v[:4], v[4], v[5], v[6], v[7]) for k, v in TASKS.items() if k in ("a", "b")}
    for name in tasks:  # the same init folders
        (tmp_path / "init").mkdir(exist_ok=True)
        os.symlink(setup[0] / "init" / name, tmp_path / "init" / name)
    overrides = {n: {"max_steps": 6} for n in tasks}
    cfg = engine_config(tmp_path, model_dir, tasks, **overrides)
    data = yaml.safe_load(cfg.read_text())
    for adapter in data["adapters"]:  # keyed dropout masks: a resumed run draws the masks it would have
        adapter["dropout"] = 0.1
    cfg.write_text(yaml.safe_dump(data))
    # uninterrupted reference, in-process
    ref_dir = tmp_path / "ref"
    ref_cfg = yaml.safe_load(cfg.read_text())
    ref_cfg["output_dir"] = str(ref_dir)
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(ref_cfg))
    assert cli_main(["train", str(tmp_path / "ref.yaml"), "--no-progress"]) == 0
    # killed once a mid-run checkpoint exists, then resumed by running the same command again
    proc = _run_cli(cfg)
    target = tmp_path / "run" / "checkpoints" / "a" / "step-000003"
    deadline = time.time() + 120
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "adapters" / "a").exists()
    out = _run_cli(cfg)
    _, err = out.communicate(timeout=300)
    assert out.returncode == 0, err
    for name in tasks:
        ours = load_file(str(tmp_path / "run" / "adapters" / name / "adapter_model.safetensors"))
        ref = load_file(str(ref_dir / "adapters" / name / "adapter_model.safetensors"))
        assert rel_diff(ours, ref) <= 1e-6, name


def test_diverging_task_fails_alone(setup, tmp_path):
    tmp, model_dir = setup
    (tmp_path / "init").mkdir()
    for name in ("a", "b"):
        os.symlink(tmp / "init" / name, tmp_path / "init" / name)
    tasks = {k: TASKS[k] for k in ("a", "b")}
    cfg = engine_config(tmp_path, model_dir, tasks, b={"optimizer": {"lr": 1e30}})
    assert cli_main(["train", str(cfg), "--no-progress"]) == 1  # a failed task makes the run exit 1
    assert (tmp_path / "run" / "adapters" / "a").is_dir()
    assert not (tmp_path / "run" / "adapters" / "b").exists()
    assert (tmp_path / "run" / "checkpoints" / "b").is_dir(), "the failed task keeps its checkpoints"
    # the surviving task ends exactly as if it had trained alone
    alone = tmp_path / "alone"
    alone.mkdir()
    os.symlink(tmp / "init" / "a", tmp_path / "alone" / "init_a")
    cfg_alone = yaml.safe_load(cfg.read_text())
    cfg_alone["output_dir"] = str(alone / "run")
    cfg_alone["tasks"] = [t for t in cfg_alone["tasks"] if t["name"] == "a"]
    cfg_alone["adapters"] = [a for a in cfg_alone["adapters"] if a["name"] == "a"]
    cfg_alone["datasets"] = [d for d in cfg_alone["datasets"] if d["name"] == "a"]
    (alone / "c.yaml").write_text(yaml.safe_dump(cfg_alone))
    assert cli_main(["train", str(alone / "c.yaml"), "--no-progress"]) == 0
    a1 = load_file(str(tmp_path / "run" / "adapters" / "a" / "adapter_model.safetensors"))
    a2 = load_file(str(alone / "run" / "adapters" / "a" / "adapter_model.safetensors"))
    assert rel_diff(a1, a2) <= 1e-6


def _cli_start(cfg: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lorafleet", "train", str(cfg), "--no-progress"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _cli_error(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert "Traceback" not in err
    return err


@pytest.mark.slow
def test_cli_bad_input_clear_errors(setup, tmp_path):
    tmp, model_dir = setup
    (tmp_path / "init").mkdir()
    os.symlink(tmp / "init" / "a", tmp_path / "init" / "a")
    good = yaml.safe_load(engine_config(tmp_path, model_dir, {"a": TASKS["a"]}).read_text())

    def variant(name: str, mutate, own_output_dir: bool = False) -> Path:
        cfg = json.loads(json.dumps(good))
        mutate(cfg)
        if own_output_dir:  # runs that go at once must not share an output folder (and its lock)
            cfg["output_dir"] = str(tmp_path / f"run-{name}")
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y"}\n{"prompt": "x", oops}\n')
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "x", "completion": "y"}\n{"prompt": "x"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    # each bad config in its own fresh `lorafleet train`, all started at once (independent runs)
    procs = {
        name: _cli_start(variant(name, mutate, own_output_dir=True))
        for name, mutate in (
            ("unknown", lambda c: c["tasks"][0].update(batch_szie=4)),
            ("type", lambda c: c["tasks"][0].update(batch_size="many")),
            ("adapter", lambda c: c["tasks"][0].update(adapter="aa")),
            ("divisible", lambda c: c["tasks"][0].update(batch_size=4, micro_batch_size=3)),
            ("json", lambda c: c["datasets"][0].update(path=str(bad))),
            ("field", lambda c: c["datasets"][0].update(path=str(missing))),
            ("empty", lambda c: c["datasets"][0].update(path=str(empty))),
        )
    }
    err = _cli_error(procs["unknown"])
    assert "batch_szie" in err and "batch_size" in err
    err = _cli_error(procs["type"])
    assert "tasks[0].batch_size" in err
    err = _cli_error(procs["adapter"])
    assert "aa" in err
    err = _cli_error(procs["divisible"])
    assert "micro_batch_size" in err
    err = _cli_error(procs["json"])
    assert "bad.jsonl:2" in err
    err = _cli_error(procs["field"])
    assert "missing.jsonl:2" in err and "completion" in err
    err = _cli_error(procs["empty"])
    assert "empty.jsonl" in err
    # a finished run's checkpoints, then the same output folder with an incompatible adapter
    ok = variant("ok", lambda c: c["tasks"][0].update(max_steps=1))
    assert cli_main(["train", str(ok), "--no-progress"]) == 0
    other = variant(
        "other",
        lambda c: (c["tasks"][0].update(max_steps=1), c["tasks"][0].update(batch_size=2, micro_batch_size=2)),
    )
    err = _cli_error(_cli_start(other))
    assert "incompatible" in err and "batch_size" in err


def test_forget_drops_finished_tasks_only(setup, tmp_path):
    from lorafleet.config import load_config
    from lorafleet.train.engine import Engine

    tmp, model_dir = setup
    (tmp_path / "init").mkdir()
    os.symlink(tmp / "init" / "a", tmp_path / "init" / "a")
    cfg = load_config(engine_config(tmp_path, model_dir, {"a": TASKS["a"]}, a={"max_steps": 1}))
    engine = Engine(cfg, tensorboard=False)
    with pytest.raises(ValueError, match="queued"):
        engine.forget("a")
    engine.run()
    assert torch.tensor(1e-40).item() != 0.0, "training must not leave denormals flushed for the process"
    assert engine.forget("a").status == "succeeded"
    assert "a" not in engine.states


def _train_variant(setup, run: Path, names: tuple[str, ...], steps: int, edit) -> dict[str, dict]:
    """Train TASKS ``names`` (``steps`` each) through ``lorafleet train`` in ``run``, the config changed by
    ``edit(cfg)``; returns each adapter's saved tensors."""
    tmp, model_dir = setup
    (run / "init").mkdir(parents=True)
    for name in names:
        os.symlink(tmp / "init" / name, run / "init" / name)
    overrides = {n: {"max_steps": steps} for n in names}
    cfg = yaml.safe_load(engine_config(run, model_dir, {n: TASKS[n] for n in names}, **overrides).read_text())
    edit(cfg)
    (run / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(run / "c.yaml"), "--no-progress"]) == 0
    return {n: load_file(str(run / "run" / "adapters" / n / "adapter_model.safetensors")) for n in names}


def _set_dropout(p: float):
    def edit(cfg: dict) -> None:
        for adapter in cfg["adapters"]:
            adapter["dropout"] = p

    return edit


@pytest.mark.slow
def test_adapter_dropout_is_active_in_training(setup, tmp_path):
    """With dropout > 0 the trained weights differ from dropout 0 (the engine trains in training mode), and the
    config's seed fixes the masks: the same config trained again in the same process ends the same."""
    results = {}
    for p in (0.0, 0.5, "0.5 again"):
        torch.rand(7)  # whatever ran before in the process
        edit = _set_dropout(0.5 if p == "0.5 again" else p)
        results[p] = _train_variant(setup, tmp_path / f"p{p}", ("a",), 2, edit)["a"]
    assert rel_diff(results[0.5], results[0.0]) > 1e-4
    assert rel_diff(results["0.5 again"], results[0.5]) == 0.0


def test_recompute_trains_the_same_weights(setup, tmp_path):
    """``recompute: true`` (per-layer activation checkpointing) changes memory, not results: with dropout on,
    two tasks in fused micro-batches end with the weights of the run that keeps every activation."""
    results = {}
    for recompute in (False, True):

        def edit(cfg: dict, recompute: bool = recompute) -> None:
            _set_dropout(0.3)(cfg)
            cfg["recompute"] = recompute

        results[recompute] = _train_variant(setup, tmp_path / f"r{recompute}", ("a", "b"), 3, edit)
    for n in ("a", "b"):
        assert rel_diff(results[True][n], results[False][n]) <= 1e-6, n
