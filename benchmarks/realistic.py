"""Realistic sequence lengths, whole processes: lorafleet's CLI against padded and padding-free packed PEFT.

Run from the repository root:

    .venv/bin/python benchmarks/realistic.py                     # both workloads, 3 repeats (about 30 min, 2 cores)
    .venv/bin/python benchmarks/realistic.py --workload realistic --repeats 2 --steps 3
    .venv/bin/python benchmarks/realistic.py --smoke             # tiny model, 1 step: a check that it runs

Workloads (4 adapters, LoRA rank 16, alpha 32, dropout 0.05 on q/k/v/o, batch 8, torch AdamW at 2e-4,
float32; the random LLaMA ``medium``: hidden 512, 8 layers, MLP 1408, 8 heads, SmolLM2's vocabulary):

- ``realistic``: example lengths (prompt + completion, in SmolLM2 tokens) drawn from a log-normal with median
  180 tokens and sigma 0.6, clipped to [32, 512]: the shape of instruction-tuning corpora such as Alpaca or
  Dolly (a median of one to two hundred tokens, a tail to the context limit); the prompt takes a uniform
  30% to 70% of each example. The text is real: consecutive windows of the chatterbot corpus' tokens of
  those lengths, decoded (so every contender tokenizes the same strings the same way).
- ``issue``: the issue's first workload: lengths uniform in [16, 256], the same construction.

Contenders, each a fresh process per run, run in turn within every repeat:

- **lorafleet**: the real command, ``python -m lorafleet train run.yaml`` (4 tasks, one engine, fused
  micro-batches without padding; metrics, TensorBoard, checkpoints, adapters and the loss plot as a user
  gets them).
- **peft_padded**: ``transformers`` + PEFT, one adapter after another, batches padded to their longest
  example (as ``DataCollatorForSeq2Seq`` pads); every adapter saved with ``save_pretrained``.
- **peft_packed**: the strongest single-adapter recipe: the same loop on padding-free packed micro-batches
  (each step's 8 examples in one row, positions restarting per example, a block-diagonal causal mask given
  as a 4D attention mask), so no padding is computed.
- **mlora**: the mlora 0.5.2 package, when ``benchmarks/.mlora-venv`` exists (``bench.py`` builds it).

Figures: **whole process** (from the command to its exit: imports, model loading, training, saving) and
**training loop** (lorafleet: from the start of the first step to the end of the last, read from
``metrics.jsonl`` as it grows; PEFT: its timed loops). For lorafleet also the time from the command to its
first step and from its last step to the exit, and the time this machine takes to read the model's weights
(``load_model`` alone, in its own process). MFU of the loop = 4 x matmul parameters x tokens/s over the float32
matmul peak measured in the same run (``common.train_flops``; attention scores not counted). Each figure is
the median of the repeats with [min-max]; speedups are taken within each repeat. Writes
``benchmarks/results/realistic.json`` and ``realistic.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CACHE_DIR,
    RESULTS_DIR,
    SMOLLM2_GGUF,
    Hyper,
    load_examples,
    lorafleet_config,
    machine_info,
    measure_matmul_peak,
    prepare_model,
    train_flops,
)

WORKLOADS = {
    "realistic": {"median": 180, "sigma": 0.6, "low": 32, "high": 512},
    "issue": {"uniform": (16, 256)},
}
CONTENDERS = ("lorafleet", "lorafleet_bf16", "peft_padded", "peft_packed", "mlora")
ADAPTERS = 4


def _lengths(spec: dict[str, Any], n: int, rng: random.Random) -> list[int]:
    if "uniform" in spec:
        lo, hi = spec["uniform"]
        return [rng.randint(lo, hi) for _ in range(n)]
    mu = math.log(spec["median"])
    return [
        min(spec["high"], max(spec["low"], round(math.exp(rng.gauss(mu, spec["sigma"]))))) for _ in range(n)
    ]


def write_workload(folder: Path, workload: str, examples_per_adapter: int) -> list[Path]:
    """``adapter{i}.jsonl`` for i < 4: prompt/completion rows of real text with the workload's lengths."""
    from common import _corpus_pairs
    from lorafleet.models.tokenizer import load_tokenizer

    tok = load_tokenizer(SMOLLM2_GGUF)
    stream: list[int] = []
    for pair in _corpus_pairs():
        stream += tok.encode(pair["prompt"] + " " + pair["completion"] + "\n", add_special_tokens=False)
    folder.mkdir(parents=True, exist_ok=True)
    paths, cursor = [], 0
    for i in range(ADAPTERS):
        rng = random.Random(1000 + i)
        rows = []
        for length in _lengths(WORKLOADS[workload], examples_per_adapter, rng):
            n = length - 1  # the eos the format appends
            p = max(1, round(n * rng.uniform(0.3, 0.7)))
            if cursor + n > len(stream):
                cursor = 0
            ids = stream[cursor : cursor + n]
            cursor += n
            rows.append({"prompt": tok.decode(ids[:p]), "completion": tok.decode(ids[p:])})
        path = folder / f"adapter{i}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------------
# The contenders' processes


def run_lorafleet(
    model_dir: Path, data: list[Path], hyper: Hyper, scratch: Path, env: dict, dtype: str = "float32"
) -> dict[str, Any]:
    """``python -m lorafleet train``: whole process, and the loop read off ``metrics.jsonl`` as it grows."""
    import yaml

    out = scratch / "run"
    cfg_path = scratch / "run.yaml"
    cfg_path.write_text(
        yaml.safe_dump(lorafleet_config(str(model_dir), dtype, [str(p) for p in data], hyper, out))
    )
    metrics = out / "metrics.jsonl"
    cmd = [sys.executable, "-m", "lorafleet", "train", str(cfg_path)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen_at: list[float] = []  # when each metrics line was first seen (lines are flushed as written)
    while proc.poll() is None:
        if metrics.is_file():
            n = len(metrics.read_text().splitlines())
            seen_at += [time.perf_counter()] * (n - len(seen_at))
        time.sleep(0.005)
    t_exit = time.perf_counter()
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"lorafleet train exited with {proc.returncode}:\n{stderr[-3000:]}")
    lines = metrics.read_text().splitlines()
    seen_at += [t_exit] * (len(lines) - len(seen_at))  # lines written within the last poll
    records = [(json.loads(x), at) for x, at in zip(lines, seen_at, strict=True) if x.strip()]
    steps = [(r, at) for r, at in records if "elapsed_s" in r]
    # A task's ``elapsed_s`` counts from the start of its own first step, so each record, paired with the
    # moment it appeared, dates that task's start; the run's first step began at the earliest of them.
    start_at = min(at - r["elapsed_s"] for r, at in steps if r["step"] == 1)
    last_at = max(at for _, at in steps)
    records = [r for r, _ in steps]
    return {
        "whole_s": t_exit - t0,
        "loop_s": last_at - start_at,
        "to_first_step_s": start_at - t0,
        "after_last_step_s": t_exit - last_at,
        "tokens": sum(r["tokens"] for r in records),
        "first_losses": [r["loss"] for r in sorted(records, key=lambda r: r["task"]) if r["step"] == 1],
        "losses": {
            t: [r["loss"] for r in sorted((r for r in records if r["task"] == t), key=lambda r: r["step"])]
            for t in sorted({r["task"] for r in records})
        },
    }


def run_mlora(examples: list, model_dir: Path, hyper: Hyper, scratch: Path, threads: int | None) -> dict:
    """mlora 0.5.2 in a fresh process of its own venv (``mlora_runner.py --whole``): whole process and loop."""
    import mlora_runner

    path = scratch / "examples.json"
    path.write_text(json.dumps(examples))
    cmd = [str(mlora_runner.venv_python()), mlora_runner.__file__, "--whole", "--model-dir", str(model_dir),
           "--examples", str(path), "--hyper", json.dumps(hyper.to_json()), "--scratch", str(scratch)]  # fmt: skip
    env = {**os.environ, **mlora_runner.worker_env(threads or os.cpu_count() or 1)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    whole = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"mlora exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"whole_s": whole, "loop_s": r["makespan_s"], "tokens": r["tokens"],
            "processed_tokens": r["processed_tokens"], "first_losses": r["first_losses"]}  # fmt: skip


def _child_peft(args: argparse.Namespace) -> None:
    """One PEFT process: every adapter one after another, padded or packed; prints a JSON line."""
    t_import = time.perf_counter()
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from lorafleet.models.tokenizer import load_tokenizer

    torch.manual_seed(0)
    hyper = Hyper(steps=args.steps)
    examples = load_examples([Path(p) for p in args.data], load_tokenizer(SMOLLM2_GGUF), hyper.max_seq_len)
    model = tf.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    loop_s, tokens, processed, first_losses = 0.0, 0, 0, []
    for i, ex in enumerate(examples):
        cfg = LoraConfig(r=hyper.rank, lora_alpha=hyper.alpha, lora_dropout=hyper.dropout,
                         target_modules=list(hyper.target_modules), task_type="CAUSAL_LM")  # fmt: skip
        pm = get_peft_model(model, cfg)
        pm.train()
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=hyper.lr, foreach=True)
        steps = [
            [ex[(s * hyper.batch_size + j) % len(ex)] for j in range(hyper.batch_size)]
            for s in range(hyper.steps)
        ]
        batches = [
            _packed(b) if args.child == "peft_packed" else _padded(b, model.config.pad_token_id or 0)
            for b in steps
        ]
        t0 = time.perf_counter()
        for step, kw in enumerate(batches):
            loss = pm(**kw).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step == 0:
                first_losses.append(float(loss.detach()))
        pm.save_pretrained(Path(args.scratch) / f"adapter{i}")
        loop_s += time.perf_counter() - t0
        tokens += sum(len(ids) for b in steps for ids, _ in b)
        processed += sum(kw["input_ids"].numel() for kw in batches)
        model = pm.unload()
    print(json.dumps({"loop_s": loop_s, "tokens": tokens, "processed_tokens": processed,
                      "first_losses": first_losses, "import_to_exit_s": time.perf_counter() - t_import}))  # fmt: skip


def _padded(batch: list, pad_id: int) -> dict[str, Any]:
    import torch

    longest = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), longest), dtype=torch.long)
    labels = torch.full((len(batch), longest), -100, dtype=torch.long)
    for b, (tokens, mask) in enumerate(batch):
        n = len(tokens)
        ids[b, :n] = torch.tensor(tokens)
        attn[b, :n] = 1
        labels[b, :n] = torch.tensor([t if m else -100 for t, m in zip(tokens, mask)])
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def _packed(batch: list) -> dict[str, Any]:
    """One row: the examples back to back, positions restarting, a block-diagonal causal 4D mask."""
    import torch

    ids = torch.tensor([t for tokens, _ in batch for t in tokens])[None]
    # The first token of every example is never a target (its mask is False), so no label crosses examples.
    labels = torch.tensor([t if m else -100 for tokens, mask in batch for t, m in zip(tokens, mask)])[None]
    positions = torch.cat([torch.arange(len(tokens)) for tokens, _ in batch])[None]
    seq = torch.cat([torch.full((len(tokens),), k) for k, (tokens, _) in enumerate(batch)])
    n = seq.numel()
    allowed = (seq[:, None] == seq[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    mask = torch.zeros(n, n).masked_fill_(~allowed, torch.finfo(torch.float32).min)[None, None]
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def run_child(kind: str, model_dir: Path, data: list[Path], hyper: Hyper, scratch: Path, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--model-dir", str(model_dir), "--scratch", str(scratch),
           "--steps", str(hyper.steps), "--data", *map(str, data)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    whole = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return {"whole_s": whole, **json.loads(proc.stdout.strip().splitlines()[-1])}


def weight_read_s(model_dir: Path, env: dict) -> float:
    code = (
        "import time, torch; from lorafleet.models import load_model; t = time.perf_counter(); "
        f"load_model({str(model_dir)!r}, dtype=torch.float32, device='cpu'); print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# The harness


def _mlora_available() -> bool:
    import mlora_runner

    return mlora_runner.installed()


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(args: argparse.Namespace, checkpoint=None) -> dict[str, Any]:
    cache = args.cache_dir
    model_dir = prepare_model(args.model, cache)
    config = json.loads((model_dir / "config.json").read_text())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)  # the peak is measured with the contenders' thread count
    hyper = Hyper(steps=args.steps)
    contenders = [
        c for c in CONTENDERS if (c != "mlora" or _mlora_available()) and (c != "lorafleet_bf16" or args.bf16)
    ]
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "model": args.model,
        "hyper": hyper.to_json(),
        "adapters": ADAPTERS,
        "repeats": args.repeats,
        "threads": args.threads,
        "contenders": contenders,
        "mlora": "ran"
        if "mlora" in contenders
        else "not installed (benchmarks/.mlora-venv missing; `benchmarks/mlora_runner.py --setup`): not run",
        "workloads": {},
    }
    for workload in args.workloads:
        data = write_workload(cache / f"realistic-{workload}", workload, hyper.steps * hyper.batch_size)
        from lorafleet.models.tokenizer import load_tokenizer

        examples = load_examples(data, load_tokenizer(SMOLLM2_GGUF), hyper.max_seq_len)
        trained = [ex[(s * hyper.batch_size + j) % len(ex)] for ex in examples for s in range(hyper.steps)
                   for j in range(hyper.batch_size)]  # fmt: skip
        lengths = sorted(len(ids) for ids, _ in trained)
        tokens, supervised = sum(lengths), sum(sum(m) for _, m in trained)
        flops = train_flops(config, tokens, supervised)
        runs: list[dict[str, Any]] = []
        for rep in range(args.repeats):
            peak = measure_matmul_peak("float32", seconds=args.peak_seconds)
            row: dict[str, Any] = {"repeat": rep, "peak_flops": peak}
            if args.bf16:
                row["peak_flops_bf16"] = measure_matmul_peak("bfloat16", seconds=args.peak_seconds)
            row["weight_read_s"] = weight_read_s(model_dir, env)
            for kind in contenders:
                with tempfile.TemporaryDirectory(prefix=f"realistic-{kind}-") as tmp:
                    if kind in ("lorafleet", "lorafleet_bf16"):
                        dtype = "bfloat16" if kind == "lorafleet_bf16" else "float32"
                        r = run_lorafleet(model_dir, data, hyper, Path(tmp), env, dtype)
                    elif kind == "mlora":
                        r = run_mlora(examples, model_dir, hyper, Path(tmp), args.threads)
                    else:
                        r = run_child(kind, model_dir, data, hyper, Path(tmp), env)
                r["loop_mfu"] = (
                    flops / r["loop_s"] / row["peak_flops_bf16" if kind.endswith("bf16") else "peak_flops"]
                )
                row[kind] = r
                print(f"[{workload} {rep + 1}/{args.repeats}] {kind}: whole {r['whole_s']:.1f} s, loop "
                      f"{r['loop_s']:.1f} s ({tokens / r['loop_s']:.0f} tokens/s, MFU {100 * r['loop_mfu']:.0f}%)",
                      flush=True)  # fmt: skip
            runs.append(row)
        report["workloads"][workload] = {
            "lengths": {"examples": len(lengths), "median": statistics.median(lengths), "max": lengths[-1],
                        "p90": lengths[int(0.9 * (len(lengths) - 1))], "mean": tokens / len(lengths)},
            "tokens": tokens,
            "supervised_tokens": supervised,
            "flops": flops,
            "runs": runs,
            "summary": _summarize(runs, contenders, tokens),
        }  # fmt: skip
        if checkpoint is not None:
            checkpoint(report)
    return report


def _summarize(runs: list[dict[str, Any]], contenders: list[str], tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "peak_flops": _summary([r["peak_flops"] for r in runs]),
        "weight_read_s": _summary([r["weight_read_s"] for r in runs]),
    }
    if "peak_flops_bf16" in runs[0]:
        out["peak_flops_bf16"] = _summary([r["peak_flops_bf16"] for r in runs])
    for c in contenders:
        s = {k: _summary([r[c][k] for r in runs]) for k in ("whole_s", "loop_s", "loop_mfu")}
        s["loop_tokens_per_s"] = _summary([tokens / r[c]["loop_s"] for r in runs])
        s["whole_tokens_per_s"] = _summary([tokens / r[c]["whole_s"] for r in runs])
        if c.startswith("lorafleet"):
            for k in ("to_first_step_s", "after_last_step_s"):
                s[k] = _summary([r[c][k] for r in runs])
        if c == "lorafleet_bf16":  # bfloat16 against lorafleet's own float32 run of the same repeat
            for k in ("whole_s", "loop_s"):
                s[f"speedup_over_float32_{k}"] = _summary([r["lorafleet"][k] / r[c][k] for r in runs])
            s["loss_deviation"] = _summary([_loss_deviation(r["lorafleet"], r[c]) for r in runs])
        elif c != "lorafleet":
            for k in ("whole_s", "loop_s"):
                s[f"lorafleet_speedup_{k}"] = _summary([r[c][k] / r["lorafleet"][k] for r in runs])
            s["processed_tokens"] = runs[0][c]["processed_tokens"]
        s["first_losses"] = runs[0][c]["first_losses"]
        out[c] = s
    return out


def _loss_deviation(ref: dict[str, Any], run: dict[str, Any]) -> float:
    """Largest |loss - float32 loss| / float32 loss over every task and step of one repeat."""
    return max(
        abs(a - b) / abs(b)
        for task, losses in ref["losses"].items()
        for a, b in zip(run["losses"][task], losses, strict=True)
    )


def _mmm(s: dict[str, float], fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    return (
        f"{fmt.format(scale * s['median'])} [{fmt.format(scale * s['min'])}-{fmt.format(scale * s['max'])}]"
    )


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"{report['date']}; {m.get('cpu', '?')}, {m.get('cores', '?')} cores; model {report['model']}; "
        f"{report['adapters']} adapters x {report['hyper']['steps']} steps x batch {report['hyper']['batch_size']}; "
        f"float32; {report.get('threads') or 'all'} thread(s) per contender; {report['repeats']} repeat(s), "
        f"median [min-max]; mlora: {report['mlora']}.",
        "",
    ]
    for workload, w in report["workloads"].items():
        s, ln = w["summary"], w["lengths"]
        lines += [
            f"**{workload}** workload: {ln['examples']} examples, {w['tokens']} tokens (median length "
            f"{ln['median']:.0f}, p90 {ln['p90']}, max {ln['max']}); float32 matmul peak "
            f"{_mmm(s['peak_flops'], '{:.0f}', 1e-9)} GFLOP/s; weights read in {_mmm(s['weight_read_s'], '{:.2f}')} s.",
            "",
            "| contender | whole process s | lorafleet speedup (whole) | training loop s | lorafleet speedup (loop) "
            "| loop tokens/s | loop MFU | tokens processed |",
            "|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for c in (k for k in report["contenders"] if k in s):
            r = s[c]
            speed_w = speed_l = "-"
            if "lorafleet_speedup_whole_s" in r:
                speed_w = _mmm(r["lorafleet_speedup_whole_s"], "{:.2f}") + "x"
                speed_l = _mmm(r["lorafleet_speedup_loop_s"], "{:.2f}") + "x"
            lines.append(
                f"| {c} | {_mmm(r['whole_s'])} | {speed_w} | {_mmm(r['loop_s'])} | {speed_l} | "
                f"{_mmm(r['loop_tokens_per_s'], '{:.0f}')} | {_mmm(r['loop_mfu'], '{:.0f}', 100)}% | "
                f"{r.get('processed_tokens', w['tokens'])} |"
            )
        lf = s["lorafleet"]
        lines += [
            "",
            f"lorafleet: command to first step {_mmm(lf['to_first_step_s'], '{:.2f}')} s (of which reading the "
            f"weights {_mmm(s['weight_read_s'], '{:.2f}')} s); last step to exit "
            f"{_mmm(lf['after_last_step_s'], '{:.2f}')} s. First-step losses: "
            + "; ".join(f"{c} " + ", ".join(f"{x:.3f}" for x in s[c]["first_losses"]) for c in s if c in CONTENDERS),
        ]  # fmt: skip
        if "lorafleet_bf16" in s:
            b = s["lorafleet_bf16"]
            lines += [
                "",
                f"bfloat16 base (adapters, optimizer and loss in float32): "
                f"{_mmm(b['speedup_over_float32_loop_s'], '{:.2f}')}x lorafleet's float32 loop tokens/s "
                f"({_mmm(b['speedup_over_float32_whole_s'], '{:.2f}')}x whole process); bfloat16 matmul peak "
                f"{_mmm(s['peak_flops_bf16'], '{:.0f}', 1e-9)} GFLOP/s (its MFU above is against it); every step's "
                f"loss within {_mmm(b['loss_deviation'], '{:.1e}')} (relative) of the float32 run's.",
            ]  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--model", default="medium", choices=["medium", "synthetic", "tiny"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per adapter")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every contender")
    p.add_argument("--peak-seconds", type=float, default=1.0)
    p.add_argument("--bf16", action="store_true", help="also lorafleet with a bfloat16 base (lorafleet_bf16)")
    p.add_argument("--smoke", action="store_true", help="the tiny model, 1 step, 1 repeat, issue workload")
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "realistic")
    p.add_argument("--child", choices=["peft_padded", "peft_packed"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    p.add_argument("--data", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child_peft(args)
        return 0
    if args.smoke:
        args.model, args.repeats, args.steps, args.workloads, args.peak_seconds = "tiny", 1, 1, ["issue"], 0.2
    t0 = time.time()

    def write(report: dict[str, Any]) -> str:  # after every workload, so a long run keeps what it measured
        report["seconds"] = time.time() - t0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        md = render_markdown(report)
        args.out.with_suffix(".md").write_text(md + "\n")
        return md

    report = run(args, write)
    md = write(report)
    print(md)
    print(f"wrote {args.out.with_suffix('.json')} and .md ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
