"""``lorafleet train``: load a config, train every task together, print the summary.

lorafleet train examples/demo.yaml
lorafleet train examples/demo.yaml --nproc 2     # a 2-stage pipeline (starts torchrun)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ..config import load_config
from .sweep import sweep_report

__all__ = ["cli_train", "print_summary", "train"]


def print_summary(states: dict, output_dir: Path) -> None:
    """A table of task, status, steps, final loss and tokens/s; where the outputs are."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lorafleet summary")
    for col in ("task", "status", "steps", "final loss", "tokens", "tokens/s"):
        table.add_column(col, justify="left" if col in ("task", "status") else "right")
    for name, st in states.items():
        loss = f"{st.last_loss:.4f}" if st.last_loss is not None else "-"
        tps = f"{st.tokens / st.busy_s:,.0f}" if st.busy_s > 0 else "-"
        table.add_row(name, st.status, f"{st.step}/{st.total_steps}", loss, f"{st.tokens:,}", tps)
    console = Console()
    console.print(table)
    for name, st in states.items():
        if st.error:
            console.print(f"[red]{name} failed:[/red] {st.error}")
    console.print(
        f"adapters: {output_dir / 'adapters'}  metrics: {output_dir / 'metrics.jsonl'}  plot: {output_dir / 'loss.png'}"
    )


def train(config_path: str | Path, progress: bool = True) -> dict:
    """Train the config in this process; returns the final task states.

    Under torchrun with WORLD_SIZE > 1 this process runs one pipeline stage (``parallel/pipeline.py``);
    rank 0 prints the summary and returns every task's state, the other ranks return {}.
    """
    cfg = load_config(config_path)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ..parallel.pipeline import run_pipeline

        result = run_pipeline(cfg, progress=progress)
        if result.states:
            print_summary(result.states, Path(cfg.output_dir))
        return result.states
    from .engine import Engine

    engine = Engine(cfg)
    states = engine.run(progress=progress)
    print_summary(states, Path(cfg.output_dir))
    sweep_report(cfg, cfg.output_dir)  # sweeps only: ranking table, sweep-<task>.png and .json
    return states


def launch_pipeline(config_path: str | Path, nproc: int, progress: bool) -> int:
    """``lorafleet train CONFIG --nproc P``: run torchrun on this machine with P processes; its exit code."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: give the number of pipeline processes, at least 1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "lorafleet", "train", str(config_path)] + ([] if progress else ["--no-progress"])
    return subprocess.call(cmd)


def cli_train(args: argparse.Namespace) -> int:
    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc != 1 and "WORLD_SIZE" not in os.environ:
        return launch_pipeline(args.config, nproc, progress=not args.no_progress)
    from ..parallel.pipeline import PipelineError

    try:
        states = train(args.config, progress=not args.no_progress)
    except PipelineError as e:
        # Threads still block on links to the failed stage, so leave at once rather than wait for them.
        print(f"lorafleet train: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    return 1 if any(st.status == "failed" for st in states.values()) else 0
