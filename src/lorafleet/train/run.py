"""``lorafleet train``: load a config, train every task together, print the summary.

    lorafleet train examples/demo.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import load_config

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
    console.print(f"adapters: {output_dir / 'adapters'}  metrics: {output_dir / 'metrics.jsonl'}  plot: {output_dir / 'loss.png'}")


def train(config_path: str | Path, progress: bool = True) -> dict:
    """Train the config in this process; returns the final task states."""
    from .engine import Engine

    cfg = load_config(config_path)
    engine = Engine(cfg)
    states = engine.run(progress=progress)
    print_summary(states, Path(cfg.output_dir))
    return states


def cli_train(args: argparse.Namespace) -> int:
    states = train(args.config, progress=not args.no_progress)
    return 1 if any(st.status == "failed" for st in states.values()) else 0
