"""The pipeline against its oracle, the single-process engine, over gloo on CPU with real processes.

One config (four tasks: LoRA, rsLoRA with LoRA+, DoRA; different batch and micro-batch sizes, schedules,
clipping across stages; one task queued behind the concurrency limit; held-out evaluation every step for
one task and with early stopping for another) is trained once in this process by the ``Engine`` and then
as a pipeline: P = 2 through ``lorafleet train --nproc 2`` (torchrun), P = 3 with
explicit boundaries, and two "nodes" (two torchrun launchers with a c10d rendezvous on 127.0.0.1). Each run
must end with the same adapter weights (relative L2 difference <= 1e-5, float32, adapter dropout 0.1:
the masks are keyed by task, example and token, so every stage draws what the single process draws), written as
PEFT folders with the single-process layout. Then a stage is killed mid-run: the others stop naming it,
and the same command resumes to the same weights. Every port is chosen free per test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import make_tiny_model
from helpers.peft_oracle import rel_diff
from lorafleet.cli import main as cli_main
from lorafleet.lora import AdapterSpec, save_peft
from lorafleet.lora.adapters import peft_key

pytestmark = pytest.mark.multiprocess

LAYERS = 6
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
# name -> adapter fields, task fields
TASKS = {
    "a": (
        {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        {"batch_size": 4, "micro_batch_size": 2, "max_steps": 4, "max_grad_norm": 0.05,
         "optimizer": {"lr": 1e-2}, "lr_scheduler": {"name": "cosine", "warmup_steps": 1}},
    ),
    "b": (
        {"rank": 8, "alpha": 8, "use_rslora": True, "lora_plus_ratio": 4.0,
         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        {"batch_size": 6, "micro_batch_size": 3, "max_steps": 3, "optimizer": {"lr": 5e-3},
         "eval_dataset": "d", "eval_every_steps": 1},
    ),
    "c": (
        {"type": "dora", "rank": 4, "alpha": 8, "target_modules": ["o_proj", "down_proj"]},
        {"batch_size": 2, "micro_batch_size": 1, "max_steps": 10,
         "optimizer": {"lr": 1e-2, "weight_decay": 0.01},
         "eval_dataset": "a", "eval_every_steps": 3, "early_stopping_patience": 1},
    ),
    "d": (
        {"rank": 2, "alpha": 4, "target_modules": ["k_proj", "up_proj"]},
        {"batch_size": 3, "max_steps": 4, "optimizer": {"lr": 2e-2},
         "lr_scheduler": {"name": "linear", "warmup_steps": 1}},
    ),
}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_peft(folder: Path, name: str, adapter: dict, model_cfg: dict, seed: int) -> None:
    """A PEFT folder with random A, B (and magnitude), so that every gradient is far from float noise."""
    spec = AdapterSpec(
        name=name,
        kind=adapter.get("type", "lora"),
        rank=adapter["rank"],
        alpha=adapter["alpha"],
        use_rslora=adapter.get("use_rslora", False),
        target_modules=tuple(adapter["target_modules"]),
    )
    h, inter, heads, kv = (
        model_cfg[k]
        for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    )
    d = h // heads
    shapes = {"q_proj": (heads * d, h), "k_proj": (kv * d, h), "v_proj": (kv * d, h), "o_proj": (h, heads * d),
              "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(LAYERS):
        for mod in spec.target_modules:
            out, inp = shapes[mod]
            where = f"layers.{layer}.{'mlp' if mod.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{mod}"
            state[peft_key(where, "lora_A.weight")] = 0.1 * torch.randn(spec.rank, inp, generator=g)
            state[peft_key(where, "lora_B.weight")] = 0.1 * torch.randn(out, spec.rank, generator=g)
            if spec.kind == "dora":
                state[peft_key(where, "lora_magnitude_vector")] = 1.0 + 0.1 * torch.rand(out, generator=g)
    save_peft(folder / name, spec, state)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Model, data, initial adapters, the config writer, and the single-process reference adapters."""
    tmp = tmp_path_factory.mktemp("pipeline")
    model_dir = tmp / "model"
    make_tiny_model(
        "smollm2", model_dir, num_hidden_layers=LAYERS
    )  # tied embeddings: the head is on the last stage
    model_cfg = json.loads((model_dir / "config.json").read_text())
    for i, (name, (adapter, _)) in enumerate(TASKS.items()):
        rows = [
            {"prompt": PROMPTS[(j + i) % 5], "completion": ANSWERS[(3 * j + i) % 5]} for j in range(7 + i)
        ]
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        _random_peft(tmp / "init", name, adapter, model_cfg, seed=i)

    def write_config(path: Path, output_dir: Path, recompute: bool = False, **pipeline) -> Path:
        cfg = {
            "base_model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
            "output_dir": str(output_dir),
            "seed": 0,
            "datasets": [
                {"name": n, "path": str(tmp / f"{n}.jsonl"), "format": "prompt_completion"} for n in TASKS
            ],
            "adapters": [
                {"name": n, "dropout": 0.1, "init_from": str(tmp / "init" / n), **adapter}
                for n, (adapter, _) in TASKS.items()
            ],
            "tasks": [
                {"name": n, "adapter": n, "dataset": n, "max_seq_len": 48, "save_every_steps": 2, **task}
                for n, (_, task) in TASKS.items()
            ],
            # Three slots: d waits in the queue and joins when a task finishes, while the pipeline runs.
            "dispatcher": {"max_concurrent_tasks": 3, "max_tokens_per_micro_batch": 96},
            "pipeline": pipeline,
            "recompute": recompute,
        }
        path.write_text(yaml.safe_dump(cfg))
        return path

    ref = tmp / "ref"
    assert cli_main(["train", str(write_config(tmp / "ref.yaml", ref)), "--no-progress"]) == 0
    reference = {n: load_file(str(ref / "adapters" / n / "adapter_model.safetensors")) for n in TASKS}
    reference["metrics"] = _records(ref)
    return tmp, write_config, reference


def _records(out: Path) -> dict[tuple, dict]:
    """metrics.jsonl by (task, step, kind): steps, evaluations and early stops."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {(r["task"], r["step"], r.get("kind", "step")): r for r in map(json.loads, lines)}


def _env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _spawn(cfg: Path, world: int, port: int) -> list[subprocess.Popen]:
    """One process per rank, as torchrun would start them (without its agent)."""
    procs = []
    for rank in range(world):
        env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}  # fmt: skip
        cmd = [sys.executable, "-m", "lorafleet", "train", str(cfg), "--no-progress"]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def _wait_all(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        out.append((p.returncode, o, e))
    return out


def _check_run(out: Path, reference: dict, num_stages: int, num_replicas: int = 1) -> None:
    """Same weights, steps, evaluations and early stops as the single process, PEFT layout, per-stage
    outputs, a trace."""
    for name in TASKS:
        ref = reference[name]
        folder = out / "adapters" / name
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        assert rel_diff(load_file(str(folder / "adapter_model.safetensors")), ref) <= 1e-5, name
        stages = sorted(p.name for p in (out / "checkpoints" / name).iterdir())
        assert stages == [f"stage-{s}-of-{num_stages}" for s in range(num_stages)]
    records, want = _records(out), reference["metrics"]
    assert set(records) == set(want)
    assert {k for k in want if k[2] == "eval"} >= {("b", 1, "eval"), ("b", 3, "eval"), ("c", 3, "eval")}
    for key, r in want.items():
        for field in ("loss", "eval_loss", "best_eval_loss", "grad_norm"):
            if field in r:
                assert abs(records[key][field] - r[field]) <= 1e-5 * max(1.0, abs(r[field])), (key, field)
    assert all(r["grad_norm"] > 0 for k, r in records.items() if k[0] == "a")  # the norm of all stages
    trace = json.loads((out / "trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"] for e in spans} == set(range(num_stages))
    assert {e["cat"] for e in spans if e["tid"] == num_stages - 1} >= {"forward+backward", "step"}
    assert {e["cat"] for e in spans if e["tid"] == 0} >= {"forward", "backward", "step"}
    want = {f"replica {r} stage {s}" for r in range(num_replicas) for s in range(num_stages)}
    assert set(trace["otherData"]["summary"]) == want
    assert {e["pid"] for e in spans} == set(range(num_replicas))


def _memory_shares(text: str, num_stages: int) -> list[float]:
    """The printed share of the model's parameters that each stage holds."""
    found = dict(
        re.findall(
            r"stage (\d+) \(rank \d+\): layers \[\d+, \d+\) hold [\d,]+ base parameters .*? = ([\d.]+)% of the model's",
            text,
        )
    )
    assert sorted(found) == [str(s) for s in range(num_stages)], text
    return [float(found[str(s)]) for s in range(num_stages)]


def test_two_stages_via_nproc_equal_single_process(setup):
    tmp, write_config, reference = setup
    out = tmp / "p2"
    cfg = write_config(tmp / "p2.yaml", out, max_in_flight=3)
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet", "train", str(cfg), "--nproc", "2", "--no-progress"],
        env=_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_run(out, reference, 2)
    shares = _memory_shares(proc.stdout, 2)
    # Each stage holds about half: its layers, plus the embedding (first) or the tied head (last).
    assert all(35 < s < 65 for s in shares), shares
    assert "lorafleet summary" in proc.stdout and "succeeded" in proc.stdout


def test_nproc_with_a_bad_base_model_is_one_user_error(setup, tmp_path):
    """Checked before torchrun starts, by the launcher without importing torch (an import hook makes that
    fail): one paragraph and exit 2, as in one process, and no stage started."""
    tmp, write_config, _ = setup
    text = write_config(tmp_path / "ok.yaml", tmp_path / "out").read_text()
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text.replace(str(tmp / "model"), str(tmp_path / "no-such-model")))
    launcher = (
        "import importlib.abc, sys\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('the launcher imported ' + name)\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from lorafleet.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", launcher, "train", str(cfg), "--nproc", "2", "--no-progress"],
        env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("lorafleet train: error: model path "), proc.stderr
    assert proc.stderr.count("does not exist") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_three_stages_with_boundaries_and_recompute_equal_single_process(setup):
    tmp, write_config, reference = setup
    out = tmp / "p3"
    cfg = write_config(tmp / "p3.yaml", out, boundaries=[2, 4], max_in_flight=2, recompute=True)
    results = _wait_all(_spawn(cfg, 3, _free_port()))
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    _check_run(out, reference, 3)
    text = "".join(o for _, o, _ in results)
    assert "layers [2, 4)" in text
    assert all(20 < s < 47 for s in _memory_shares(text, 3))


@pytest.mark.slow
def test_two_replicas_of_two_stages_split_the_tasks(setup):
    """WORLD_SIZE 4 = 2 replicas x 2 stages: each pipeline trains every other task, exchanging nothing."""
    tmp, write_config, reference = setup
    out = tmp / "replicas"
    cfg = write_config(tmp / "replicas.yaml", out, stages=2)
    results = _wait_all(_spawn(cfg, 4, _free_port()))
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    _check_run(out, reference, 2, num_replicas=2)
    assert "4 processes = 2 replica(s) x 2 stages" in results[0][1]


@pytest.mark.slow
def test_two_nodes_on_loopback_equal_single_process(setup):
    tmp, write_config, reference = setup
    out = tmp / "nodes"
    cfg = write_config(tmp / "nodes.yaml", out)
    port = _free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "lorafleet-test", "-m", "lorafleet", "train", str(cfg), "--no-progress"]  # fmt: skip
        procs.append(
            subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    for rc, _, err in _wait_all(procs):
        assert rc == 0, err[-3000:]
    _check_run(out, reference, 2)


@pytest.mark.slow
def test_dead_stage_stops_the_others_and_the_rerun_resumes(setup):
    tmp, write_config, reference = setup
    out = tmp / "fault"
    cfg = write_config(tmp / "fault.yaml", out)
    procs = _spawn(cfg, 2, _free_port())
    # Stop stage 1 at once when it has a checkpoint of the long task, then kill it: a crash mid-run.
    target = out / "checkpoints" / "c" / "stage-1-of-2" / "step-000004"
    deadline = time.time() + 180
    while not target.exists() and time.time() < deadline and procs[1].poll() is None:
        time.sleep(0.005)
    procs[1].send_signal(signal.SIGSTOP)
    assert procs[0].poll() is None, "the run ended before a stage could be killed"
    killed_at = time.time()
    procs[1].send_signal(signal.SIGKILL)
    rc, _, err = _wait_all(procs[:1], timeout=60)[0]
    assert time.time() - killed_at < 30
    assert rc != 0
    assert "stage 1 (rank 1) stopped answering" in err, err[-2000:]
    procs[1].wait()
    assert not (out / "adapters" / "c").exists()
    # The same command again: every task resumes from the newest step both stages saved.
    results = _wait_all(_spawn(cfg, 2, _free_port()))
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    for name in TASKS:
        got = load_file(str(out / "adapters" / name / "adapter_model.safetensors"))
        assert rel_diff(got, reference[name]) <= 1e-5, name
    # the steps redone after the common checkpoint are logged once (issue 19): one record per step
    lines = (out / "metrics.jsonl").read_text().splitlines()
    seen = [(r["task"], r["step"]) for r in map(json.loads, lines) if "kind" not in r]
    assert len(seen) == len(set(seen)), sorted(k for k in set(seen) if seen.count(k) > 1)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (one per stage, NCCL)")
def test_two_stages_on_cuda_nccl_equal_single_process(setup):
    tmp, write_config, reference = setup
    out = tmp / "cuda"
    cfg = write_config(tmp / "cuda.yaml", out)
    data = yaml.safe_load(cfg.read_text())
    data["base_model"]["device"] = "cuda"
    cfg.write_text(yaml.safe_dump(data))
    for rc, _, err in _wait_all(_spawn(cfg, 2, _free_port())):
        assert rc == 0, err[-3000:]
    for name in TASKS:  # TF32 off by default in torch: float32 matmuls stay exact enough
        got = load_file(str(out / "adapters" / name / "adapter_model.safetensors"))
        assert rel_diff(got, reference[name]) <= 1e-4, name


def test_impossible_topology_is_refused_with_the_arithmetic(setup, monkeypatch, capsys):
    tmp, write_config, _ = setup
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    cfg = write_config(tmp / "bad.yaml", tmp / "bad", stages=2)
    assert cli_main(["train", str(cfg), "--no-progress"]) == 2
    assert "WORLD_SIZE (3) is not a multiple of pipeline.stages (2): 3 = 1 x 2 + 1" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = write_config(tmp / "bad.yaml", tmp / "bad")
    assert cli_main(["train", str(cfg), "--no-progress"]) == 2
    assert f"pipeline.stages (8) > num_hidden_layers ({LAYERS})" in capsys.readouterr().err
