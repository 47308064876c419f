"""The benchmark harness (benchmarks/): its FLOP count, memory probe and a real end-to-end run in --smoke mode.

No performance assertion: the smoke run checks that the harness writes its JSON, Markdown and charts, that
every contender trained on the same real tokens and supervised tokens, and that lorafleet's first-step loss
equals the one HF transformers + PEFT computes on the same batch (the adapters start with B = 0, so both are
the base model's loss on the same examples: an independent check that they trained on the same data).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
from vs_peft import sequential_prefix, step_batch  # noqa: E402


def test_matmul_params_counts_the_projections_transformers_builds():
    import torch
    import transformers as tf

    cfg = dict(
        vocab_size=300,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=24,  # != hidden / heads, as in Qwen3: the count must use head_dim
        tie_word_embeddings=False,
    )
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg))
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.endswith(names)
    )
    layers, head = common.matmul_params(cfg)
    assert layers == expected
    assert head == model.lm_head.weight.numel()
    assert common.train_flops(cfg, tokens=10, supervised_tokens=4) == 4.0 * (expected * 10 + head * 4)


def test_step_batch_takes_the_next_examples_in_order_and_wraps():
    examples = list(range(5))
    assert step_batch(examples, 0, 3) == [0, 1, 2]
    assert step_batch(examples, 1, 3) == [3, 4, 0]
    assert step_batch(examples, 2, 3) == [1, 2, 3]


def test_sequential_prefix_adds_the_first_n_adapters_times():
    per = [
        {"seconds": 2.0, "tokens": 10, "supervised_tokens": 5, "processed_tokens": 16, "first_loss": 1.0},
        {"seconds": 3.0, "tokens": 20, "supervised_tokens": 7, "processed_tokens": 24, "first_loss": 2.0},
        {"seconds": 4.0, "tokens": 30, "supervised_tokens": 9, "processed_tokens": 32, "first_loss": 3.0},
    ]
    two = sequential_prefix(per, 2)
    assert two["makespan_s"] == 5.0 and two["completion_s"] == [2.0, 5.0]
    assert (two["tokens"], two["supervised_tokens"], two["processed_tokens"]) == (30, 12, 40)
    assert two["first_losses"] == [1.0, 2.0]


def test_peak_rss_rises_with_an_allocation_and_resets():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc")
    common.reset_peak_rss()
    before = common.peak_rss_bytes()
    block = bytearray(256 * 2**20)
    for i in range(0, len(block), 4096):  # touch every page so it is resident
        block[i] = 1
    assert common.peak_rss_bytes() >= before + 200 * 2**20
    del block
    common.reset_peak_rss()
    assert common.peak_rss_bytes() < before + 100 * 2**20


@pytest.mark.slow
def test_smoke_run_writes_results_and_every_contender_trains_the_same_tokens(tmp_path):
    out, cache = tmp_path / "results", tmp_path / "cache"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke", "--out-dir", str(out)]
    proc = subprocess.run(cmd + ["--cache-dir", str(cache)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench_smoke.json").read_text())
    for name in ("bench_smoke.md", "bench_smoke_tokens_per_s.png", "bench_smoke_memory.png"):
        assert (out / name).stat().st_size > 0, name

    rows = report["summary"]
    by_n: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_n.setdefault(r["num_adapters"], {})[r["contender"]] = r
    assert sorted(by_n) == [1, 2]
    assert set(by_n[1]) == {"lorafleet", "peft_sequential"}
    assert set(by_n[2]) == {"lorafleet", "peft_sequential", "peft_parallel"}
    for n, contenders in by_n.items():
        tokens = {c: (r["tokens"], r["supervised_tokens"]) for c, r in contenders.items()}
        assert len(set(tokens.values())) == 1, f"N={n}: contenders trained different tokens: {tokens}"
        assert tokens["lorafleet"][0] > tokens["lorafleet"][1] > 0
        # PEFT pads every batch to its longest example; lorafleet packs without padding.
        assert (
            contenders["peft_sequential"]["processed_tokens"] >= contenders["lorafleet"]["processed_tokens"]
        )
        ours = contenders["lorafleet"]["first_losses"]
        for c in ("peft_sequential", "peft_parallel"):
            if c in contenders:
                assert ours == pytest.approx(contenders[c]["first_losses"], rel=1e-4), c
        for r in contenders.values():
            assert r["mfu"]["median"] > 0 and r["peak_rss_bytes_per_process"]["median"] > 0
    md = (out / "bench_smoke.md").read_text()
    assert "| tiny | float32 | 2 | peft_parallel |" in md
    assert "| target | measured | verdict |" in md

    (out / "bench_smoke.md").unlink()  # --render rebuilds the Markdown from the JSON alone
    render = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench.py"),
        "--render",
        str(out / "bench_smoke.json"),
    ]
    proc = subprocess.run(render, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "bench_smoke.md").read_text().splitlines()[3:] == md.splitlines()[3:]


@pytest.mark.slow
def test_memory_benchmark_runs_every_variant_on_the_same_work(tmp_path):
    """benchmarks/memory.py on the tiny model: every variant and N in its own process, the same tokens
    trained whatever the memory settings (they change memory, never the work), a table and its JSON."""
    out = tmp_path / "memory.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--model", "tiny", "--repeats", "1",
           "--threads", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"default", "budget 512", "recompute", "recompute + budget 512"}
    for n in (1, 8):
        runs = [r for r in report["runs"] if r["n"] == n]
        assert len(runs) == 4 and len({r["tokens"] for r in runs}) == 1, runs
        assert all(r["peak_rss_bytes"] > 0 and r["tokens_per_s"] > 0 for r in runs)
    assert "| recompute + budget 512 |" in proc.stdout
