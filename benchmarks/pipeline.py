"""A 2-stage LoRA-aware pipeline against one process and against FSDP, with the same adapters, data and steps.

Run from the repository root (CPU, SmolLM2-135M; a few minutes per repeat on 2 idle cores):

    .venv/bin/python benchmarks/pipeline.py --repeats 2            # 4 tasks, P = 2 -> results/pipeline.{json,md}
    .venv/bin/python benchmarks/pipeline.py --max-tokens 480 --skip single --out pipeline_480
    .venv/bin/python benchmarks/pipeline.py --model synthetic --tasks 6 --steps 3

The default token budget of a fused micro-batch (``--max-tokens 160``) holds one task's micro-batch of 4
chatterbot examples, so consecutive micro-batches mostly belong to different tasks; with 480, three or four
tasks share every micro-batch (more efficient matmuls, but their steps all end together).

Every contender trains the same config (``common.prepare_workload``: 4+ tasks of real chatterbot text, the
SmolLM2 tokenizer, rank 16 on q/k/v/o, batch 8 in micro-batches of 4, AdamW, float32) from the same base
weights, and must end with the same adapters (the table shows the largest relative difference to the
single process, a check that all three did the same work):

- **single** / **single-1-thread**: one process, the ``Engine``, with every core (torch threads = cores) or
  with one thread (on a machine that other work shares, one thread can be the faster of the two); the
  better of the two is the single-process figure the others are compared with.
- **pipeline**: ``torchrun --nproc-per-node 2 -m lorafleet train``-style: two stages of ``run_pipeline``, one
  thread each; activations go forward and gradients back over gloo (loopback).
- **fsdp**: two processes with the whole model under ``torch.distributed.fsdp.fully_shard`` (FSDP2, one
  unit per decoder layer plus the root), one thread each, data parallel: each rank runs half of every fused
  micro-batch's examples (the dispatcher's plan is the same on both), losses scaled so that the summed
  gradient is the single-process one; the frozen weights are gathered for every forward and backward.

Reported: tokens/s over the training loop (model loading and tokenizing excluded), average task
completion time (from the loop's start to a task's last optimizer step), and for the pipeline each stage's
idle fraction in steady state (from ``trace.json``). Results go to benchmarks/results/pipeline.json and
pipeline.md; the pipeline run's trace to benchmarks/results/pipeline_trace.json (open it in
https://ui.perfetto.dev) and a picture of it to pipeline_trace.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine_info, prepare_model, prepare_workload

# name -> (processes: None = --nproc, torch threads per process: None = every core)
CONTENDERS = {"single": (1, None), "single-1-thread": (1, 1), "pipeline": (None, 1), "fsdp": (None, 1)}


def write_config(
    folder: Path,
    model: Path,
    num_tasks: int,
    steps: int,
    max_tokens: int,
    boundaries: list[int] | None = None,
) -> Path:
    """The benchmark's run config (YAML) and its data, in ``folder``."""
    import yaml

    paths = prepare_workload(folder / "data", num_tasks, examples_per_adapter=64)
    names = [f"task{i}" for i in range(num_tasks)]
    cfg = {
        "base_model": {"path": str(model), "dtype": "float32", "device": "cpu"},
        "output_dir": str(folder / "run"),
        "seed": 0,
        "datasets": [
            {"name": n, "path": str(p), "format": "prompt_completion"} for n, p in zip(names, paths)
        ],
        "adapters": [
            {
                "name": n,
                "rank": 16,
                "alpha": 32,
                "dropout": 0.0,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            }
            for n in names
        ],
        "tasks": [
            {
                "name": n,
                "adapter": n,
                "dataset": n,
                "batch_size": 8,
                "micro_batch_size": 4,
                "max_steps": steps,
                "max_seq_len": 128,
                "shuffle": False,
                "optimizer": {"lr": 2.0e-4},
                "save_every_steps": 1000,
            }
            for n in names
        ],  # fmt: skip
        "dispatcher": {"max_concurrent_tasks": num_tasks, "max_tokens_per_micro_batch": max_tokens},
        "pipeline": {"max_in_flight": 4, "boundaries": boundaries},  # stages: one per process
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# -- contenders (each in its own processes) ------------------------------------------------------------------


def _single(cfg_path: Path) -> dict[str, Any]:
    import torch

    from lorafleet.config import load_config
    from lorafleet.train.engine import Engine
    from lorafleet.train.events import StatusEvent

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    engine = Engine(load_config(cfg_path), tensorboard=False)
    finish: dict[str, float] = {}
    engine.subscribe(
        lambda e: (
            finish.setdefault(e.task, time.time() - tic)
            if isinstance(e, StatusEvent) and e.status == "succeeded"
            else None
        )
    )
    tic = time.time()
    while engine.run_once():
        pass
    wall = time.time() - tic
    engine.close()
    return {"wall_s": wall, "finish_s": finish, "tokens": sum(s.tokens for s in engine.states.values())}


def _pipeline(cfg_path: Path) -> dict[str, Any] | None:
    import torch

    from lorafleet.config import load_config
    from lorafleet.parallel import run_pipeline, trace_summary

    torch.set_num_threads(1)
    result = run_pipeline(load_config(cfg_path))
    if not result.states:
        return None  # rank > 0
    return {
        "wall_s": result.wall_s,
        "finish_s": result.finish_s,
        "tokens": sum(s.tokens for s in result.states.values()),
        "idle": trace_summary(result.trace),
    }


def _fsdp(cfg_path: Path) -> dict[str, Any] | None:
    """Data-parallel FSDP2 over every process; the engine's tasks, plans and losses, half of each plan per rank."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from lorafleet.config import load_config
    from lorafleet.lora import adapter_parameters, lora_plus_param_groups
    from lorafleet.models import load_model
    from lorafleet.models.tokenizer import load_tokenizer
    from lorafleet.train.dispatcher import PlanItem, next_waited, plan_next
    from lorafleet.train.engine import pack_plan
    from lorafleet.train.optim import build_optimizer, build_scheduler
    from lorafleet.train.task import Task

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(cfg_path)
    model = load_model(cfg.base_model.path, torch.float32, "cpu")
    tokenizer = load_tokenizer(cfg.base_model.path)
    datasets, adapters = {d.name: d for d in cfg.datasets}, {a.name: a for a in cfg.adapters}
    ckpt = Path(cfg.output_dir) / "checkpoints"
    tasks = {
        t.name: Task(
            cfg,
            model,
            tokenizer,
            datasets[t.dataset],
            adapters[t.adapter],
            t,
            i,
            checkpoint_dir=ckpt / t.name,
        )
        for i, t in enumerate(cfg.tasks)
    }

    class Root(torch.nn.Module):
        """The root FSDP unit: the forward and the losses, so the (tied) head is gathered when the loss runs."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch, weights: dict[str, float]):
            hidden = self.model.forward_packed(batch.input_ids, batch, apply_head=False)
            total = hidden.new_zeros(())
            for name, w in weights.items():
                t = tasks[name]
                share = t.kind.loss(self.model.lm_head, hidden, batch, name, norms[name]).loss
                total = total + w * share
            return total

    root = Root()
    for layer in model.layers.values():
        fully_shard(layer)
    fully_shard(root)
    norms = {}
    for t in tasks.values():  # FSDP swapped the parameters for sharded ones: optimizers on those
        opt, sched = t.cfg.optimizer, t.cfg.lr_scheduler
        t.params = adapter_parameters(model, t.spec.name)
        groups = lora_plus_param_groups(t.params, opt.lr, adapters[t.cfg.adapter].lora_plus_ratio)
        t.optimizer = build_optimizer(groups, opt.name, opt.lr, opt.weight_decay, opt.betas, opt.eps)
        t.scheduler = build_scheduler(t.optimizer, sched.name, sched.warmup_steps, t.state.total_steps)
        t.begin_step()
        norms[t.cfg.name] = t.step_norm
    waited: dict[str, int] = {}
    finish: dict[str, float] = {}
    tokens = 0
    dist.barrier()
    tic = time.time()
    while True:
        live = [t for t in tasks.values() if t.state.status in ("queued", "running")]
        views = [t.view(waited.get(t.cfg.name, 0)) for t in live]
        limit = cfg.dispatcher.max_concurrent_tasks
        plan = plan_next(views, max_tokens=cfg.dispatcher.max_tokens_per_micro_batch, max_concurrent=limit)
        waited = next_waited(views, plan, max_concurrent=limit)
        if not plan:
            break
        mine, weights = [], {}
        for item in plan:
            tasks[item.task].state.status = "running"
            part = item.examples[rank::world]
            # Every rank must hold every planned task (FSDP reduces the same gradients everywhere): a rank
            # with no example of it runs one with weight 0.
            weights[item.task] = 1.0 if part else 0.0
            mine.append(PlanItem(item.task, part or item.examples[:1], item.ends_step))
            tokens += sum(len(tasks[item.task].example_at(p).tokens) for p in item.examples)
        batch = pack_plan(mine, tasks, "cpu")
        (world * root(batch, weights)).backward()  # FSDP averages over ranks; the step's gradient is the sum
        for item in plan:
            t = tasks[item.task]
            del t.pending[: len(item.examples)]
            if t.pending:
                continue
            t.optimizer.step()
            t.scheduler.step()
            t.optimizer.zero_grad(set_to_none=True)
            t.state.step += 1
            if t.state.step >= t.state.total_steps:
                t.state.status = "succeeded"
                finish[t.cfg.name] = time.time() - tic
            else:
                t.begin_step()
                norms[t.cfg.name] = t.step_norm
    wall = time.time() - tic
    out_dir = Path(cfg.output_dir) / "adapters"
    for t in tasks.values():  # gather the shards of each adapter for the equivalence check
        full = {k: p.full_tensor().detach().clone() for k, p in t.params.items()}
        if rank == 0:
            from lorafleet.lora import save_peft

            save_peft(out_dir / t.spec.name, t.spec, full)
    dist.barrier()
    dist.destroy_process_group()
    return {"wall_s": wall, "finish_s": finish, "tokens": tokens} if rank == 0 else None


def _worker(contender: str, cfg_path: Path, result_path: Path) -> None:
    runner = {"single": _single, "single-1-thread": _single, "pipeline": _pipeline, "fsdp": _fsdp}
    result = runner[contender](cfg_path)
    if result is not None:
        result_path.write_text(json.dumps(result))


# -- the harness -------------------------------------------------------------------------------------------


def _run(contender: str, cfg_path: Path, result_path: Path, nproc: int) -> dict[str, Any]:
    procs, threads = CONTENDERS[contender]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads or os.cpu_count() or 1)}
    me = [
        str(Path(__file__).resolve()),
        "--worker",
        contender,
        "--config",
        str(cfg_path),
        "--result",
        str(result_path),
    ]
    if procs == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *me,
        ]
    result_path.unlink(missing_ok=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result_path.is_file():
        raise RuntimeError(f"{contender} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(result_path.read_text())


def _adapters(run_dir: Path) -> dict[str, dict]:
    from safetensors.torch import load_file

    return {
        p.name: load_file(str(p / "adapter_model.safetensors"))
        for p in sorted((run_dir / "adapters").iterdir())
    }


def _rel_diff(a: dict[str, dict], b: dict[str, dict]) -> float:
    worst = 0.0
    for name in b:
        num = sum(float((a[name][k] - b[name][k]).norm() ** 2) for k in b[name]) ** 0.5
        den = sum(float(v.norm() ** 2) for v in b[name].values()) ** 0.5
        worst = max(worst, num / den)
    return worst


def _plot_trace(trace_path: Path, out: Path) -> None:
    """Each stage's forward, backward and step spans on one time axis (the gaps are the bubbles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [e for e in json.loads(trace_path.read_text())["traceEvents"] if e["ph"] == "X"]
    colors = {"forward": "#4C72B0", "backward": "#DD8452", "forward+backward": "#55A868", "step": "#C44E52"}
    stages = sorted({e["tid"] for e in events})
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.6 * len(stages)), dpi=110)
    for e in events:
        ax.broken_barh(
            [(e["ts"] / 1e6, e["dur"] / 1e6)], (e["tid"] - 0.4, 0.8), color=colors.get(e["cat"], "grey")
        )
    ax.set_yticks(stages, [f"stage {s}" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, list(colors), ncol=4, fontsize=8, loc="lower center")
    ax.set_title("pipeline trace: busy spans per stage (white = idle)")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "synthetic"])
    parser.add_argument("--tasks", type=int, default=4, help="tasks (adapters) trained together")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per task")
    parser.add_argument("--max-tokens", type=int, default=160, help="dispatcher.max_tokens_per_micro_batch")
    parser.add_argument(
        "--boundaries", type=int, nargs="+", default=None, help="pipeline.boundaries (default: by cost)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of every contender")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the pipeline and of FSDP")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=list(CONTENDERS), help="contenders not to run"
    )
    parser.add_argument("--out", default="pipeline", help="results name: benchmarks/results/NAME.{json,md}")
    parser.add_argument("--worker", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.config, args.result)
        return
    import shutil

    work = RESULTS_DIR.parent / ".cache" / "pipeline-bench"
    shutil.rmtree(work, ignore_errors=True)
    model = prepare_model(args.model)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONTENDERS}
    adapters: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for contender in [c for c in CONTENDERS if c not in args.skip]:
            folder = work / f"{contender}-{repeat}"
            cfg = write_config(folder, model, args.tasks, args.steps, args.max_tokens, args.boundaries)
            print(f"[{repeat + 1}/{args.repeats}] {contender} ...", flush=True)
            r = _run(contender, cfg, folder / "result.json", args.nproc)
            r["tokens_per_s"] = r["tokens"] / r["wall_s"]
            r["avg_completion_s"] = statistics.mean(r["finish_s"].values())
            runs[contender].append(r)
            adapters[contender] = _adapters(folder / "run")
            print(f"    {r['wall_s']:.1f} s, {r['tokens_per_s']:.1f} tokens/s", flush=True)
            if contender == "pipeline":
                RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                shutil.copy(folder / "run" / "trace.json", RESULTS_DIR / f"{args.out}_trace.json")
    rows = []
    # The better of the two single-process runs: on a loaded machine one thread can beat two.
    singles = [c for c in ("single", "single-1-thread") if runs[c]]
    single_tps = max((statistics.median(r["tokens_per_s"] for r in runs[c]) for c in singles), default=None)
    fsdp_tps = statistics.median(r["tokens_per_s"] for r in runs["fsdp"]) if runs["fsdp"] else None
    for contender in [c for c in CONTENDERS if runs[c]]:
        rs = runs[contender]
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        procs, threads = CONTENDERS[contender]
        row = {
            "contender": contender,
            "processes": procs or args.nproc,
            "threads_per_process": threads or os.cpu_count(),
            "tokens": rs[0]["tokens"],
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "tokens_per_s": tps,
            "avg_completion_s": statistics.median(r["avg_completion_s"] for r in rs),
            "vs_single": tps / single_tps if single_tps else None,
            "vs_fsdp": tps / fsdp_tps if fsdp_tps else None,
            "max_rel_diff_vs_single": _rel_diff(adapters[contender], adapters[singles[0]])
            if singles
            else None,
        }
        if contender == "pipeline":
            idle = [r["idle"] for r in rs]
            stages = sorted(idle[0])
            row["steady_idle_fraction"] = {
                s: statistics.median(i[s]["steady_idle_fraction"] for i in idle) for s in stages
            }
            row["idle_fraction"] = {s: statistics.median(i[s]["idle_fraction"] for i in idle) for s in stages}
        rows.append(row)
    info = machine_info()
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": info,
        "model": args.model,
        "tasks": args.tasks,
        "steps": args.steps,
        "max_tokens_per_micro_batch": args.max_tokens,
        "repeats": args.repeats,
        "rows": rows,
        "runs": runs,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.out}.json").write_text(json.dumps(report, indent=2))
    _plot_trace(RESULTS_DIR / f"{args.out}_trace.json", RESULTS_DIR / f"{args.out}_trace.png")
    md = _markdown(report)
    (RESULTS_DIR / f"{args.out}.md").write_text(md)
    print(md)


def _markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    load = ", ".join(f"{x:.1f}" for x in m["load_average"]) if m.get("load_average") else "?"
    lines = [
        f"{report['model']}, {report['tasks']} tasks x {report['steps']} steps (batch 8, micro-batches of 4), "
        f"max_tokens_per_micro_batch {report['max_tokens_per_micro_batch']}, float32; {m['cpu']}, "
        f"{m['cores']} cores; {report['date']}; load average at the end {load}; median of {report['repeats']} run(s).",
        "",
        "| contender | processes x threads | tokens/s | vs best single | vs FSDP | avg task completion (s) "
        "| steady-state idle per stage | same adapters (max rel. diff) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        idle = ", ".join(f"{100 * v:.0f}%" for v in r.get("steady_idle_fraction", {}).values()) or "-"
        lines.append(
            f"| {r['contender']} | {r['processes']} x {r['threads_per_process']} | {r['tokens_per_s']:.1f} | "
            f"{_fmt(r['vs_single'], '{:.2f}x')} | {_fmt(r['vs_fsdp'], '{:.2f}x')} | {r['avg_completion_s']:.1f} | "
            f"{idle} | {_fmt(r['max_rel_diff_vs_single'], '{:.1e}')} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


if __name__ == "__main__":
    main()
