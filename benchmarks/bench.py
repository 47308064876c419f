"""The side-by-side benchmark: lorafleet against HF PEFT, the mlora package and (when it lands) FSDP.

    lorafleet bench                              # = .venv/bin/python benchmarks/bench.py (the full table)
    .venv/bin/python benchmarks/bench.py --quick # a short version (fewer scenarios, one run each)
    .venv/bin/python benchmarks/bench.py --smoke --out-dir /tmp/b --cache-dir /tmp/c   # seconds; the test's mode
    .venv/bin/python benchmarks/bench.py --repeats 5 --no-mlora

Workload (``common.py``): N adapters (N in 1, 2, 4, 8), LoRA rank 16, alpha 32, dropout 0.05 on q/k/v/o,
batch 8, torch AdamW at 2e-4, real chatterbot text tokenized by the SmolLM2 tokenizer (lengths as the corpus
has them, 5 to ~300 tokens); the random LLaMA-shaped model (hidden 1024, 8 layers, vocabulary 49152) in
float32 and bfloat16, and the real SmolLM2-135M. Every contender trains the same examples in the same order:

    lorafleet        one Engine, N tasks, fused micro-batches without padding        (vs_peft.py)
    peft_sequential  transformers + PEFT, one adapter after another, padded batches  (vs_peft.py)
    peft_parallel    N such processes at once, one adapter each, cores / N threads   (when memory allows)
    mlora            the mlora 0.5.2 package in its own venv                          (mlora_runner.py)
    fsdp, lorafleet_pipeline  torch FSDP2 (fully_shard) and lorafleet's pipeline over 2 processes: the full run
                     starts benchmarks/pipeline.py (its own workload and table, owned there) and embeds
                     its results/pipeline.json; --no-pipeline skips it

The sequential PEFT run trains the largest N's adapters once per repeat; the run of N adapters is its first
N adapters (their times add up: that is what "one after another" means). Metrics per contender: real
tokens/s (no padding), makespan, average task completion time, peak resident memory per process and in
total, and MFU = matmul FLOPs/s (``common.train_flops``) over the matmul peak that this run measures (at its
start and before every scenario; the best measurement counts), per dtype. Each figure is the median of ``--repeats`` runs with min and max; contenders are
interleaved run by run, and the ratios (lorafleet over each contender) are taken within each repeat.

Writes ``<out-dir>/<name>.json`` (every run), ``<name>.md`` (the tables, the targets and whether they are
met) and ``<name>_*.png``; name is ``bench``, ``bench_quick`` or ``bench_smoke``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CACHE_DIR,
    RESULTS_DIR,
    SMOLLM2_GGUF,
    Hyper,
    RunResult,
    Worker,
    WorkerError,
    available_memory_bytes,
    load_examples,
    machine_info,
    measure_matmul_peak,
    prepare_model,
    prepare_workload,
    summarize,
    train_flops,
)
from vs_peft import run_request, sequential_prefix, start_worker, to_result

__all__ = ["Plan", "Scenario", "main", "plan_for", "render_markdown", "run_plan"]

CONTENDERS = ("lorafleet", "peft_sequential", "peft_parallel", "mlora", "fsdp", "lorafleet_pipeline")
GiB = 2**30


@dataclass(frozen=True)
class Scenario:
    """One (model, dtype) group: lorafleet and PEFT sequential at every N, the others at ``extras_at``."""

    model: str
    dtype: str
    adapters: tuple[int, ...]
    extras_at: tuple[int, ...] = ()


@dataclass(frozen=True)
class Plan:
    name: str
    scenarios: tuple[Scenario, ...]
    repeats: int
    hyper: Hyper = field(default_factory=Hyper)
    mlora: bool = True
    parallel: bool = True
    pipeline: bool = False
    warmup: bool = True  # one untimed run per worker first (allocator, kernels)
    threads: int | None = None  # torch threads per contender process (None: every core)
    peak_seconds: float = 1.0  # per matmul size, for the peak


def plan_for(mode: str, repeats: int | None, mlora: bool, parallel: bool, pipeline: bool = True) -> Plan:
    """The scenarios of ``full``, ``quick`` or ``smoke``; ``repeats`` overrides the mode's default."""
    if mode == "smoke":
        scenarios = (Scenario("tiny", "float32", (1, 2), extras_at=(2,)),)
        return Plan("bench_smoke", scenarios, repeats or 1, Hyper(steps=1), mlora=False, parallel=parallel,
                    warmup=False, peak_seconds=0.2)  # fmt: skip
    if mode == "quick":
        scenarios = (
            Scenario("synthetic", "float32", (1, 4), extras_at=(4,)),
            Scenario("synthetic", "bfloat16", (4,)),
        )
        return Plan("bench_quick", scenarios, repeats or 1, Hyper(steps=1), mlora=mlora, parallel=False)
    scenarios = (  # most important first: a run cut short keeps the finished scenarios
        Scenario("synthetic", "float32", (1, 2, 4, 8), extras_at=(4,)),
        Scenario("smollm2", "float32", (4,)),
        Scenario("synthetic", "bfloat16", (1, 2, 4, 8), extras_at=(4,)),
        Scenario("smollm2", "bfloat16", (4,)),
    )
    return Plan(
        "bench", scenarios, repeats or 3, Hyper(steps=1), mlora=mlora, parallel=parallel, pipeline=pipeline
    )


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _model_bytes(model_dir: Path, dtype: str) -> int:
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))  # float32 on disk
    return size // 2 if dtype == "bfloat16" else size


class _Group:
    """The worker processes of one scenario; started together, closed together."""

    def __init__(self) -> None:
        self.workers: dict[str, Worker | list[Worker]] = {}

    def close(self) -> None:
        for w in self.workers.values():
            for one in w if isinstance(w, list) else [w]:
                one.close()


def _run_scenario(
    sc: Scenario, plan: Plan, cache: Path, examples_all, paths_all, threads: int
) -> dict[str, Any]:
    """Every run of one scenario; returns {"runs": [...], "skipped": {contender: reason}}."""
    model_dir = prepare_model(sc.model, cache)
    logs, scratch = cache / "logs", cache / "runs"
    scratch.mkdir(parents=True, exist_ok=True)
    hyper = plan.hyper
    warm = Hyper(**{**hyper.__dict__, "steps": 1})
    runs: list[RunResult] = []
    skipped: dict[str, str] = {}
    group = _Group()
    tag = f"{sc.model}-{sc.dtype}"
    try:
        _log(f"{tag}: starting workers")
        pending: list[tuple[str, Worker]] = []  # load requests sent, replies not yet read: loads overlap
        for kind in ("lorafleet", "peft_sequential"):
            w = start_worker(kind, model_dir, sc.dtype, threads, f"{kind}-{tag}", logs, wait=False)
            group.workers[kind] = w
            pending.append((kind, w))
        for n in sc.extras_at:
            if plan.parallel:
                need = int(n * _model_bytes(model_dir, sc.dtype) * 2.5)
                avail = available_memory_bytes()
                if avail is not None and need > avail:
                    skipped[f"peft_parallel@{n}"] = (
                        f"{n} processes need about {need / GiB:.1f} GiB, {avail / GiB:.1f} GiB available"
                    )
                else:
                    per = max(1, threads // n)
                    ws = [
                        start_worker(
                            "peft_single", model_dir, sc.dtype, per, f"peft_single{i}-{tag}", logs, False
                        )
                        for i in range(n)
                    ]
                    group.workers[f"peft_parallel@{n}"] = ws
                    pending.extend((f"peft_parallel@{n}", w) for w in ws)
            if plan.mlora:
                try:
                    import mlora_runner

                    mlora_runner.ensure_venv(_log)
                    w = Worker(mlora_runner.worker_argv(), env=mlora_runner.worker_env(threads),
                               name=f"mlora-{tag}", log_dir=logs)  # fmt: skip
                    group.workers[f"mlora@{n}"] = w
                    w.send({"op": "load", "model_dir": str(model_dir), "dtype": sc.dtype, "threads": threads})
                    pending.append((f"mlora@{n}", w))
                except (RuntimeError, OSError) as e:
                    skipped[f"mlora@{n}"] = (
                        f"mlora could not run here: {str(e).strip().splitlines()[0][:300]}"
                    )
        for key, w in pending:
            try:
                w.receive()
            except WorkerError as e:
                if not key.startswith("mlora"):
                    raise
                w.close()
                del group.workers[key]
                skipped[key] = f"mlora could not run here: {str(e).strip().splitlines()[0][:300]}"
        if plan.warmup:
            _log(f"{tag}: warm-up")
            live = [one for w in group.workers.values() for one in (w if isinstance(w, list) else [w])]
            for one in live:  # at once: nothing is measured yet
                one.send(run_request(paths_all[:1], examples_all[:1], warm, -1, scratch))
            for one in live:
                one.receive()
        biggest = max(sc.adapters)
        for r in range(plan.repeats):
            for n in sc.adapters:
                paths, examples = paths_all[:n], examples_all[:n]
                reply = group.workers["lorafleet"].call(run_request(paths, examples, hyper, r, scratch))
                runs.append(to_result("lorafleet", sc.model, sc.dtype, r, reply))
                _log(
                    f"{tag} repeat {r + 1}/{plan.repeats} N={n} lorafleet {runs[-1].tokens_per_s:.1f} tokens/s"
                )
                if n in sc.extras_at:
                    runs.extend(_extras(group, sc, n, r, paths, examples, hyper, scratch, skipped))
            reply = group.workers["peft_sequential"].call(
                run_request(paths_all[:biggest], examples_all[:biggest], hyper, r, scratch)
            )
            for n in sc.adapters:
                part = {
                    **sequential_prefix(reply["per_adapter"], n),
                    "peak_rss_bytes": reply["peak_rss_bytes"],
                }
                part["threads"] = reply.get("threads", 0)
                runs.append(to_result("peft_sequential", sc.model, sc.dtype, r, part))
            _log(f"{tag} repeat {r + 1}/{plan.repeats} peft_sequential {runs[-1].tokens_per_s:.1f} tokens/s")
    finally:
        group.close()
    return {"runs": runs, "skipped": skipped}


def _extras(
    group: _Group, sc: Scenario, n: int, r: int, paths, examples, hyper, scratch, skipped
) -> list[RunResult]:
    out: list[RunResult] = []
    tag = f"{sc.model}-{sc.dtype}"
    par = group.workers.get(f"peft_parallel@{n}")
    if isinstance(par, list):
        for i, w in enumerate(par):  # all started before any answer is read: they train at once
            w.send(run_request(paths[i : i + 1], examples[i : i + 1], hyper, r, scratch))
        replies = [w.receive() for w in par]
        start = min(x["start"] for x in replies)
        done = [x["end"] - start for x in replies]
        res = RunResult(
            contender="peft_parallel",
            model=sc.model,
            dtype=sc.dtype,
            num_adapters=n,
            repeat=r,
            tokens=sum(x["tokens"] for x in replies),
            supervised_tokens=sum(x["supervised_tokens"] for x in replies),
            processed_tokens=sum(x["processed_tokens"] for x in replies),
            makespan_s=max(done),
            completion_s=done,
            peak_rss_bytes=[x["peak_rss_bytes"] for x in replies],
            first_losses=[x["first_losses"][0] for x in replies],
            threads=replies[0].get("threads", 0),
        )
        out.append(res)
        _log(f"{tag} repeat {r + 1} N={n} peft_parallel {res.tokens_per_s:.1f} tokens/s")
    ml = group.workers.get(f"mlora@{n}")
    if isinstance(ml, Worker) and f"mlora@{n}" not in skipped:
        try:
            reply = ml.call(run_request(paths, examples, hyper, r, scratch))
            out.append(to_result("mlora", sc.model, sc.dtype, r, reply))
            _log(f"{tag} repeat {r + 1} N={n} mlora {out[-1].tokens_per_s:.1f} tokens/s")
        except WorkerError as e:
            skipped[f"mlora@{n}"] = f"mlora failed: {str(e).strip().splitlines()[0][:300]}"
    return out


def run_plan(plan: Plan, cache: Path, on_scenario=None) -> dict[str, Any]:
    """Run every scenario of ``plan``; returns the report (machine, peaks, runs, summaries).

    ``on_scenario(report)`` gets the report so far after each scenario (the harness writes it, so a run cut
    short still leaves its finished scenarios on disk).
    """
    import torch

    from lorafleet.models.tokenizer import load_tokenizer

    threads = plan.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    # The peak is measured at the start and again before every scenario, and the best measurement counts:
    # on a shared machine one measurement can land in a busy moment and make MFU look too good.
    samples: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    peaks: dict[str, float] = {}

    def measure_peaks() -> None:
        for dt in samples:
            samples[dt].append(measure_matmul_peak(dt, seconds=plan.peak_seconds))
            peaks[dt] = max(samples[dt])
        _log("matmul peak so far: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))

    _log(f"{plan.name}: measuring the matmul peak ({threads} threads)")
    measure_peaks()
    biggest = max(n for sc in plan.scenarios for n in sc.adapters)
    hyper = plan.hyper
    paths = prepare_workload(cache / "workload", biggest, hyper.steps * hyper.batch_size)
    examples = load_examples(paths, load_tokenizer(SMOLLM2_GGUF), hyper.max_seq_len)
    t0 = time.perf_counter()
    runs: list[RunResult] = []
    skipped: dict[str, str] = {}
    configs: dict[str, dict] = {}

    def report(done: int) -> dict[str, Any]:
        return {
            "benchmark": plan.name,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "lorafleet bench " + " ".join(sys.argv[1:]),
            "machine": machine_info(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": threads,
            "wall_s": time.perf_counter() - t0,
            "scenarios_done": done,
            "scenarios": len(plan.scenarios),
            "hyper": hyper.to_json(),
            "repeats": plan.repeats,
            "matmul_peak_flops": dict(peaks),
            "matmul_peak_samples": {k: list(v) for k, v in samples.items()},
            "skipped": skipped,
            "pipeline": None,
            "summary": summarize_runs(runs, peaks, configs),
            "runs": [x.__dict__ for x in runs],
        }

    for i, sc in enumerate(plan.scenarios):
        if i > 0:
            measure_peaks()
        configs[sc.model] = json.loads((prepare_model(sc.model, cache) / "config.json").read_text())
        got = _run_scenario(sc, plan, cache, examples, paths, threads)
        runs.extend(got["runs"])
        skipped.update({f"{sc.model}/{sc.dtype}/{k}": v for k, v in got["skipped"].items()})
        if on_scenario is not None and i + 1 < len(plan.scenarios):
            on_scenario(report(i + 1))
    final = report(len(plan.scenarios))
    if plan.pipeline:
        final["pipeline"] = run_pipeline_bench(plan.repeats)
    return final


PIPELINE_SCRIPT = Path(__file__).resolve().parent / "pipeline.py"


def run_pipeline_bench(repeats: int) -> dict[str, Any]:
    """Run benchmarks/pipeline.py (pipeline vs one process vs FSDP) and return its results/pipeline.json."""
    if not PIPELINE_SCRIPT.is_file():
        return {"error": "benchmarks/pipeline.py is not in this checkout"}
    _log(f"pipeline and FSDP: {PIPELINE_SCRIPT.name} --repeats {repeats}")
    proc = subprocess.run([sys.executable, str(PIPELINE_SCRIPT), "--repeats", str(repeats)], text=True,
                          capture_output=True)  # fmt: skip
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        return {"error": f"pipeline.py exited with {proc.returncode}: " + " / ".join(tail)}
    return load_pipeline_json(RESULTS_DIR / "pipeline.json")


def load_pipeline_json(path: Path) -> dict[str, Any]:
    """pipeline.py's report (rows of contender, tokens_per_s, vs_fsdp, ...), or {"error": why not}."""
    try:
        data = json.loads(path.read_text())
        rows = {r["contender"]: r for r in data["rows"]}
        return {"source": str(path.name), "date": data.get("date"), "model": data.get("model"),
                "tasks": data.get("tasks"), "repeats": data.get("repeats"), "rows": rows}  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {"error": f"no usable {path.name}: {type(e).__name__}: {e}"}


def summarize_runs(runs: list[RunResult], peaks: dict[str, float], configs: dict[str, dict]) -> list[dict]:
    """One row per (model, dtype, N, contender): medians, min/max, MFU, memory, and lorafleet's speedup."""
    order: dict[tuple[str, str], int] = {}  # scenarios in the order they ran
    for x in runs:
        order.setdefault((x.model, x.dtype), len(order))
    keys = sorted(
        {(x.model, x.dtype, x.num_adapters, x.contender) for x in runs},
        key=lambda k: (order[k[0], k[1]], k[2], CONTENDERS.index(k[3])),
    )
    rows = []
    for model, dtype, n, contender in keys:
        mine = sorted((x for x in runs if (x.model, x.dtype, x.num_adapters, x.contender) == (model, dtype, n, contender)),
                      key=lambda x: x.repeat)  # fmt: skip
        ours = {
            x.repeat: x
            for x in runs
            if (x.model, x.dtype, x.num_adapters, x.contender) == (model, dtype, n, "lorafleet")
        }
        flops = [train_flops(configs[model], x.tokens, x.supervised_tokens) / x.makespan_s for x in mine]
        row = {
            "model": model,
            "dtype": dtype,
            "num_adapters": n,
            "contender": contender,
            "repeats": len(mine),
            "tokens": mine[0].tokens,
            "supervised_tokens": mine[0].supervised_tokens,
            "processed_tokens": mine[0].processed_tokens,
            "tokens_per_s": summarize([x.tokens_per_s for x in mine]),
            "makespan_s": summarize([x.makespan_s for x in mine]),
            "avg_completion_s": summarize([statistics.mean(x.completion_s) for x in mine]),
            "peak_rss_bytes_per_process": summarize([max(x.peak_rss_bytes) for x in mine]),
            "peak_rss_bytes_total": summarize([sum(x.peak_rss_bytes) for x in mine]),
            "processes": len(mine[0].peak_rss_bytes),
            "mfu": summarize([f / peaks[dtype] for f in flops]),
            "first_losses": mine[0].first_losses,
        }
        paired = [ours[x.repeat].tokens_per_s / x.tokens_per_s for x in mine if x.repeat in ours]
        if contender != "lorafleet" and paired:
            row["lorafleet_speedup"] = summarize(paired)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Markdown and charts


def _mmm(s: dict[str, float], fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    return (
        f"{fmt.format(s['median'] * scale)} [{fmt.format(s['min'] * scale)}-{fmt.format(s['max'] * scale)}]"
    )


def _row(report: dict, model: str, dtype: str, n: int, contender: str) -> dict | None:
    for r in report["summary"]:
        if (r["model"], r["dtype"], r["num_adapters"], r["contender"]) == (model, dtype, n, contender):
            return r
    return None


def targets(report: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each of the issue's targets that this run could measure."""
    out = []
    for model, dtype in sorted({(r["model"], r["dtype"]) for r in report["summary"]}):
        peft = _row(report, model, dtype, 4, "peft_sequential")
        if peft and "lorafleet_speedup" in peft:
            s = peft["lorafleet_speedup"]
            out.append((f"{model} {dtype}: 4 adapters >= 1.5x PEFT sequential tokens/s", _mmm(s, "{:.2f}") + "x",
                        _verdict(s["median"], 1.5)))  # fmt: skip
        ml = _row(report, model, dtype, 4, "mlora")
        if ml and "lorafleet_speedup" in ml:
            s = ml["lorafleet_speedup"]
            out.append(
                (
                    f"{model} {dtype}: >= 3x the mlora package",
                    _mmm(s, "{:.2f}") + "x",
                    _verdict(s["median"], 3.0),
                )
            )
        ours = _row(report, model, dtype, 4, "lorafleet")
        if ours:
            m = ours["mfu"]
            out.append((f"{model} {dtype}: MFU >= 50% of the measured peak (4 adapters)",
                        _mmm(m, "{:.0f}", 100) + "%", _verdict(m["median"], 0.5)))  # fmt: skip
        one, eight = _row(report, model, dtype, 1, "lorafleet"), _row(report, model, dtype, 8, "lorafleet")
        if one and eight:
            ratio = (
                eight["peak_rss_bytes_per_process"]["median"] / one["peak_rss_bytes_per_process"]["median"]
            )
            out.append((f"{model} {dtype}: memory of 8 adapters <= 1.3x that of 1", f"{ratio:.2f}x",
                        _verdict(1.3, ratio)))  # fmt: skip
    pipe = _pipeline_part(report)
    row = (pipe.get("rows") or {}).get("pipeline")
    if row and "vs_fsdp" in row:
        out.append((f"{pipe.get('model')} float32: pipeline >= 1.3x FSDP ({pipe.get('tasks')} tasks, 2 processes)",
                    f"{row['vs_fsdp']:.2f}x", _verdict(row["vs_fsdp"], 1.3)))  # fmt: skip
    else:
        out.append(("pipeline >= 1.3x FSDP", "not measured", pipe.get("error", "")))
    return out


def _pipeline_part(report: dict) -> dict[str, Any]:
    pipe = report.get("pipeline")
    if isinstance(pipe, dict):
        return pipe
    return {"error": pipe or "not run (--no-pipeline, --quick or --smoke)"}


def _verdict(value: float, target: float) -> str:
    if value >= target:
        return "met"
    return f"missed by {100 * (1 - value / target):.0f}%"


def render_markdown(report: dict) -> str:
    m = report["machine"]
    partial = ""
    if report.get("scenarios_done", 0) < report.get("scenarios", 0):
        partial = f" PARTIAL: {report['scenarios_done']} of {report['scenarios']} scenarios finished so far."
    lines = [
        f"Run {report['date']} on {m['cpu']}, {m['cores']} cores, {(m['memory_bytes'] or 0) / GiB:.0f} GiB, "
        f"{report['threads']} torch threads, torch {report['torch']}; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in (m['load_average'] or []))} (a shared machine: compare ratios, "
        f"which were measured side by side, rather than absolute rates).",
        f"Command: `{report['command'].strip()}` ({report['repeats']} run(s) per figure: median [min-max]; "
        f"{report['wall_s'] / 60:.0f} min).{partial} Matmul peak (the best of "
        f"{len(report.get('matmul_peak_samples', {}).get('float32', [0]))} measurement(s) during the run): "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in report["matmul_peak_flops"].items())
        + ".",
        "",
        "| model | dtype | N | contender | real tokens (processed) | tokens/s | makespan s | avg completion s "
        "| peak RSS GiB per process (total) | MFU | lorafleet speedup (per repeat) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["summary"]:
        sp = _mmm(r["lorafleet_speedup"], "{:.2f}") + "x" if "lorafleet_speedup" in r else "-"
        rss = f"{r['peak_rss_bytes_per_process']['median'] / GiB:.2f}"
        if r["processes"] > 1:
            rss += f" ({r['peak_rss_bytes_total']['median'] / GiB:.2f}, {r['processes']} processes)"
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['num_adapters']} | {r['contender']} | {r['tokens']} "
            f"({r['processed_tokens']}) | {_mmm(r['tokens_per_s'])} | {r['makespan_s']['median']:.1f} | "
            f"{r['avg_completion_s']['median']:.1f} | {rss} | {_mmm(r['mfu'], '{:.0f}', 100)}% | {sp} |"
        )
    lines += [
        "",
        "tokens/s, MFU: median [min-max] over the repeats. lorafleet speedup: lorafleet's tokens/s over the "
        "contender's within each repeat (the two ran minutes apart, under the same stretch of load), median "
        "[min-max] of those ratios; on a machine whose load swings it can differ from the ratio of the medians.",
    ]
    pipe = _pipeline_part(report)
    if pipe.get("rows"):
        lines += [
            "",
            f"Pipeline and FSDP (benchmarks/pipeline.py, {pipe.get('model')}, {pipe.get('tasks')} tasks, float32, "
            f"{pipe.get('date')}, median of {pipe.get('repeats')}):",
            "",
            "| contender | processes | tokens/s | vs FSDP | avg completion s |",
            "|---|---|---|---|---|",
        ]
        for name, r in pipe["rows"].items():
            lines.append(
                f"| {name} | {r.get('processes', '?')} | {r.get('tokens_per_s', 0):.1f} | "
                f"{r.get('vs_fsdp', 0):.2f}x | {r.get('avg_completion_s', 0):.1f} |"
            )
    if report["skipped"]:
        lines += ["", "Not measured:", ""]
        lines += [f"- {k}: {v}" for k, v in report["skipped"].items()]
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {v} | {d} |" for t, v, d in targets(report)]
    return "\n".join(lines) + "\n"


def render_charts(report: dict, prefix: Path) -> list[Path]:
    """tokens/s by N for every contender, per (model, dtype); peak memory by N (lorafleet, PEFT sequential)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = report["summary"]
    groups = sorted({(r["model"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.6), squeeze=False)
    for ax, (model, dtype) in zip(axes[0], groups):
        for contender in CONTENDERS:
            pts = sorted((r["num_adapters"], r["tokens_per_s"]) for r in rows
                         if (r["model"], r["dtype"], r["contender"]) == (model, dtype, contender))  # fmt: skip
            if not pts:
                continue
            xs = [p[0] for p in pts]
            med = [p[1]["median"] for p in pts]
            err = [[p[1]["median"] - p[1]["min"] for p in pts], [p[1]["max"] - p[1]["median"] for p in pts]]
            ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=contender)
        ns = sorted({r["num_adapters"] for r in rows if (r["model"], r["dtype"]) == (model, dtype)})
        ax.set_title(f"{model} {dtype}")
        ax.set_xlabel("adapters N")
        ax.set_ylabel("real tokens/s (median, min-max)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(f"{prefix}_tokens_per_s.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for model, dtype in groups:
        for contender, style in (("lorafleet", "-"), ("peft_sequential", "--")):
            pts = sorted((r["num_adapters"], r["peak_rss_bytes_per_process"]["median"] / GiB) for r in rows
                         if (r["model"], r["dtype"], r["contender"]) == (model, dtype, contender))  # fmt: skip
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                        label=f"{contender} {model} {dtype}")  # fmt: skip
    ns = sorted({r["num_adapters"] for r in rows})
    ax.set_xlabel("adapters N")
    ax.set_ylabel("peak RSS GiB (median)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(f"{prefix}_memory.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer scenarios, one run each")
    mode.add_argument("--smoke", action="store_true", help="a tiny model, seconds (what the test runs)")
    p.add_argument("--repeats", type=int, default=None, help="runs per figure (default 3; quick and smoke 1)")
    p.add_argument("--no-mlora", action="store_true", help="skip the mlora package (and its venv install)")
    p.add_argument("--no-parallel", action="store_true", help="skip N PEFT processes at once")
    p.add_argument(
        "--no-pipeline", action="store_true", help="skip benchmarks/pipeline.py (pipeline vs FSDP)"
    )
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per contender (default: every core; 1 is steadier on a busy machine)")  # fmt: skip
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only rewrite the Markdown and charts of an earlier run's JSON (a full run without "
                   "pipeline results takes the current results/pipeline.json)")  # fmt: skip
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="models, workload, logs, the mlora venv")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    if args.render is not None:
        report = json.loads(args.render.read_text())
        pipe = report.get("pipeline")
        if report["benchmark"] == "bench" and not (isinstance(pipe, dict) and pipe.get("rows")):
            report["pipeline"] = load_pipeline_json(RESULTS_DIR / "pipeline.json")
        runs = [RunResult(**x) for x in report["runs"]]
        models = {x.model for x in runs}
        folders = {m: args.cache_dir / m / "config.json" for m in models}
        if all(f.is_file() for f in folders.values()):  # the summary again, by this version's rules
            configs = {m: json.loads(f.read_text()) for m, f in folders.items()}
            report["summary"] = summarize_runs(runs, report["matmul_peak_flops"], configs)
        prefix = args.render.with_suffix("")
        args.render.write_text(json.dumps(report, indent=2) + "\n")
        Path(f"{prefix}.md").write_text(render_markdown(report))
        render_charts(report, prefix)
        print(render_markdown(report))
        return 0
    plan = plan_for("smoke" if args.smoke else "quick" if args.quick else "full", args.repeats,
                    mlora=not args.no_mlora, parallel=not args.no_parallel,
                    pipeline=not args.no_pipeline)  # fmt: skip
    if args.threads is not None:
        plan = replace(plan, threads=args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    prefix = args.out_dir / plan.name

    def write(report: dict) -> str:
        Path(f"{prefix}.json").write_text(json.dumps(report, indent=2) + "\n")
        md = render_markdown(report)
        Path(f"{prefix}.md").write_text(md)
        return md

    report = run_plan(plan, args.cache_dir, on_scenario=write)
    md = write(report)
    charts = render_charts(report, prefix)
    print(md)
    print(f"wrote {prefix}.json, {prefix}.md, " + ", ".join(str(c) for c in charts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
