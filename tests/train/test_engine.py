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
from lorafleet.cli import main as cli_main

PROMPTS = [
    "What is the capital of France?",
    "Hello world.",
    "The quick brown fox",
    "def add(a, b):",
    "caf\u00e9, na\u00efve",
    "HELLO, it's a tiny tokenizer",
    "jumps over the lazy dog",
    "12345 times!",
    "they'll see.",
    "Paris is",
]
COMPLETIONS = [
    "The capital of France is Paris.",
    "hello World.",
    "jumps over the lazy dog, 12345 times!",
    "return a + b",
    "\u65e5\u672c\u8a9e emoji",
    "for tests; they'll see.",
    "12345",
    "quick brown",
    "Hello",
    "the capital of France.",
]


def _write_data(path: Path, shift: int, n: int) -> None:
    rows = [
        {"prompt": PROMPTS[(i + shift) % 10], "completion": COMPLETIONS[(i * 3 + shift) % 10]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# adapter name -> (rank, alpha, targets, lr, batch_size, micro_batch_size, rows, rslora)
TASKS = {
    "a": (4, 8, ["q_proj", "v_proj"], 1e-2, 4, 4, 9, False),
    "b": (
        8,
        8,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        5e-3,
        4,
        2,
        7,
        True,
    ),
    "c": (2, 4, ["o_proj", "down_proj"], 2e-2, 2, 1, 5, False),
}
STEPS = 3


def _peft_init(model_dir: Path, out: Path, name: str, rank, alpha, targets, rslora, seed) -> None:
    """An adapter made by PEFT with random A and B (so every gradient is non-trivial)."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    base = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora)
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(out / name)


def _config(tmp: Path, model_dir: Path, tasks: dict, **task_overrides) -> Path:
    cfg = {
        "base_model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "output_dir": str(tmp / "run"),
        "seed": 0,
        "datasets": [],
        "adapters": [],
        "tasks": [],
        "dispatcher": {"max_concurrent_tasks": 8, "max_tokens_per_micro_batch": 256},
    }
    for i, (name, (rank, alpha, targets, lr, bs, mbs, rows, rslora)) in enumerate(tasks.items()):
        _write_data(tmp / f"{name}.jsonl", i, rows)
        cfg["datasets"].append(
            {"name": name, "path": str(tmp / f"{name}.jsonl"), "format": "prompt_completion"}
        )
        cfg["adapters"].append(
            {
                "name": name,
                "rank": rank,
                "alpha": alpha,
                "dropout": 0.0,
                "use_rslora": rslora,
                "target_modules": targets,
                "init_from": str(tmp / "init" / name),
            }
        )
        task = {
            "name": name,
            "adapter": name,
            "dataset": name,
            "batch_size": bs,
            "micro_batch_size": mbs,
            "max_steps": STEPS,
            "max_seq_len": 64,
            "shuffle": False,
            "optimizer": {"lr": lr, "weight_decay": 0.01},
            "save_every_steps": 1,
        }
        task.update(task_overrides.get(name, {}))
        cfg["tasks"].append(task)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _peft_alone(model_dir: Path, tmp: Path, name: str, spec: tuple, shift: int) -> dict[str, torch.Tensor]:
    """The oracle: one PEFT model, torch AdamW, the same examples in the same order, loss = sum CE / count."""
    import transformers as tf
    from peft import PeftModel

    rank, alpha, targets, lr, bs, mbs, rows, rslora = spec
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    data = [json.loads(line) for line in (tmp / f"{name}.jsonl").read_text().splitlines()]
    examples = []
    for r in data:
        p = tok(r["prompt"], add_special_tokens=True)["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (p + c)[:64]
        labels = ([-100] * len(p) + c)[:64]
        examples.append((ids, labels))
    base = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, tmp / "init" / name, is_trainable=True)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    for step in range(STEPS):
        batch = [examples[(step * bs + j) % len(examples)] for j in range(bs)]
        count = sum(sum(1 for x in lab[1:] if x != -100) for _, lab in batch)
        total = 0.0
        for ids, lab in batch:
            logits = pm(torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(lab[1:])
            total = total + torch.nn.functional.cross_entropy(
                logits, target, ignore_index=-100, reduction="sum"
            )
        (total / count).backward()
        opt.step()
        opt.zero_grad()
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    model_dir = tmp / "model"
    make_tiny_model("llama2", model_dir)
    for i, (name, (rank, alpha, targets, *_rest)) in enumerate(TASKS.items()):
        _peft_init(model_dir, tmp / "init", name, rank, alpha, targets, TASKS[name][7], seed=10 + i)
    return tmp, model_dir


def _rel_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    num = sum(float((a[k].float() - b[k].float()).norm() ** 2) for k in a) ** 0.5
    den = sum(float(b[k].float().norm() ** 2) for k in b) ** 0.5
    return num / den


def test_together_equals_peft_alone(setup):
    tmp, model_dir = setup
    cfg = _config(tmp, model_dir, TASKS)
    assert cli_main(["train", str(cfg), "--no-progress"]) == 0
    for i, (name, spec) in enumerate(TASKS.items()):
        ours = load_file(str(tmp / "run" / "adapters" / name / "adapter_model.safetensors"))
        ref = _peft_alone(model_dir, tmp, name, spec, i)
        init = load_file(str(tmp / "init" / name / "adapter_model.safetensors"))
        assert _rel_diff(ours, init) > 1e-3, "training must have moved the weights"
        assert _rel_diff(ours, ref) <= 1e-5, name
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
    cfg = _config(tmp_path, model_dir, tasks, **overrides)
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
        assert _rel_diff(ours, ref) <= 1e-6, name


def test_diverging_task_fails_alone(setup, tmp_path):
    tmp, model_dir = setup
    (tmp_path / "init").mkdir()
    for name in ("a", "b"):
        os.symlink(tmp / "init" / name, tmp_path / "init" / name)
    tasks = {k: TASKS[k] for k in ("a", "b")}
    cfg = _config(tmp_path, model_dir, tasks, b={"optimizer": {"lr": 1e30}})
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
    assert _rel_diff(a1, a2) <= 1e-6


def _cli_error(cfg: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet", "train", str(cfg), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_cli_bad_input_clear_errors(setup, tmp_path):
    tmp, model_dir = setup
    (tmp_path / "init").mkdir()
    os.symlink(tmp / "init" / "a", tmp_path / "init" / "a")
    good = yaml.safe_load(_config(tmp_path, model_dir, {"a": TASKS["a"]}).read_text())

    def variant(name: str, mutate) -> Path:
        cfg = json.loads(json.dumps(good))
        mutate(cfg)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    err = _cli_error(variant("unknown", lambda c: c["tasks"][0].update(batch_szie=4)))
    assert "batch_szie" in err and "batch_size" in err
    err = _cli_error(variant("type", lambda c: c["tasks"][0].update(batch_size="many")))
    assert "tasks[0].batch_size" in err
    err = _cli_error(variant("adapter", lambda c: c["tasks"][0].update(adapter="aa")))
    assert "aa" in err
    err = _cli_error(variant("divisible", lambda c: c["tasks"][0].update(batch_size=4, micro_batch_size=3)))
    assert "micro_batch_size" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y"}\n{"prompt": "x", oops}\n')
    err = _cli_error(variant("json", lambda c: c["datasets"][0].update(path=str(bad))))
    assert "bad.jsonl:2" in err
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "x", "completion": "y"}\n{"prompt": "x"}\n')
    err = _cli_error(variant("field", lambda c: c["datasets"][0].update(path=str(missing))))
    assert "missing.jsonl:2" in err and "completion" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = _cli_error(variant("empty", lambda c: c["datasets"][0].update(path=str(empty))))
    assert "empty.jsonl" in err
    # a finished run's checkpoints, then the same output folder with an incompatible adapter
    ok = variant("ok", lambda c: c["tasks"][0].update(max_steps=1))
    assert cli_main(["train", str(ok), "--no-progress"]) == 0
    other = variant(
        "other",
        lambda c: (c["tasks"][0].update(max_steps=1), c["tasks"][0].update(batch_size=2, micro_batch_size=2)),
    )
    err = _cli_error(other)
    assert "incompatible" in err and "batch_size" in err


def test_forget_drops_finished_tasks_only(setup, tmp_path):
    from lorafleet.config import load_config
    from lorafleet.train.engine import Engine

    tmp, model_dir = setup
    (tmp_path / "init").mkdir()
    os.symlink(tmp / "init" / "a", tmp_path / "init" / "a")
    cfg = load_config(_config(tmp_path, model_dir, {"a": TASKS["a"]}, a={"max_steps": 1}))
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
    cfg = yaml.safe_load(_config(run, model_dir, {n: TASKS[n] for n in names}, **overrides).read_text())
    edit(cfg)
    (run / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(run / "c.yaml"), "--no-progress"]) == 0
    return {n: load_file(str(run / "run" / "adapters" / n / "adapter_model.safetensors")) for n in names}


def _set_dropout(p: float):
    def edit(cfg: dict) -> None:
        for adapter in cfg["adapters"]:
            adapter["dropout"] = p

    return edit


def test_adapter_dropout_is_active_in_training(setup, tmp_path):
    """With dropout > 0 the trained weights differ from dropout 0 (the engine trains in training mode), and the
    config's seed fixes the masks: the same config trained again in the same process ends the same."""
    results = {}
    for p in (0.0, 0.5, "0.5 again"):
        torch.rand(7)  # whatever ran before in the process
        edit = _set_dropout(0.5 if p == "0.5 again" else p)
        results[p] = _train_variant(setup, tmp_path / f"p{p}", ("a",), 2, edit)["a"]
    assert _rel_diff(results[0.5], results[0.0]) > 1e-4
    assert _rel_diff(results["0.5 again"], results[0.5]) == 0.0


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
        assert _rel_diff(results[True][n], results[False][n]) <= 1e-6, n
