"""Hyper-parameter sweeps: one task with lists of values becomes one adapter and task per combination.

    lorafleet train examples/sweep.yaml      # 8 combinations on the bundled SmolLM2: ranking table + PNG

A task may carry ``sweep:`` with lists of values, e.g. ``{lr: [1.0e-4, 1.0e-3], rank: [4, 8], alpha: [8,
16]}``. When the config is validated it expands into the product of the lists (8 here): one copy of the
task per combination, each with its own copy of the task's adapter, named ``<task>-<values>`` (e.g.
``science-lr0p001-r8-a16``), all trained together on the one base model in one process. Every copy records
where it came from (``sweep_point``: the original task's name and the values), so after training
``sweep_report`` ranks the combinations by eval loss (the loss of the adapter that is kept: the best one
when the task early-stops, the last one otherwise), prints the table, writes it as JSON and plots the
training and eval loss curves of every combination to ``OUTPUT_DIR/sweep-<task>.png``.

A sweep must fit the dispatcher: if the expanded run has more tasks than
``dispatcher.max_concurrent_tasks``, the extra ones would wait for free slots rather than train together,
which is rarely what a sweep means; validation refuses it with the numbers and the ways out, one of which
is ``sweep.queue: true`` (run them in waves).

Expansion itself is part of the config (``lorafleet.config.sweep``); this module ranks the results.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["sweep_report"]


def _kept_eval(evals: list[tuple[int, float]], early_stopping: bool) -> tuple[int, float] | None:
    """(step, eval loss) of the adapter that is kept: the best with early stopping, else the last."""
    if not evals:
        return None
    if early_stopping:
        return min(evals, key=lambda se: (se[1] if math.isfinite(se[1]) else math.inf, se[0]))
    return evals[-1]


def sweep_report(
    cfg: Any, output_dir: str | Path, print_table: bool = True
) -> dict[str, list[dict[str, Any]]]:
    """Rank every sweep's combinations by eval loss; print the table, write ``sweep-<task>.json`` and ``.png``.

    Returns ``{original task name: ranked rows}``; each row has ``place`` (1 = best), ``task``, the swept
    values, ``eval_loss`` and ``eval_step`` (of the kept adapter; None when it was never evaluated, ranked
    last), ``final_train_loss`` and ``steps``.
    """
    from ..metrics import read_metrics

    output_dir = Path(output_dir)
    groups: dict[str, list[Any]] = defaultdict(list)
    for t in cfg.tasks:
        if t.sweep_point is not None:
            groups[t.sweep_point.task].append(t)
    if not groups:
        return {}
    records = read_metrics(output_dir / "metrics.jsonl")
    train: dict[str, list[tuple[int, float]]] = defaultdict(list)
    evals: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        if r.get("kind", "train") == "train" and "loss" in r:
            train[r["task"]].append((r["step"], r["loss"]))
        elif r.get("kind") == "eval" and "eval_loss" in r:
            evals[r["task"]].append((r["step"], r["eval_loss"]))
    reports = {}
    for group, tasks in groups.items():
        rows = []
        for t in tasks:
            kept = _kept_eval(evals[t.name], t.early_stopping_patience is not None)
            rows.append(
                {
                    "task": t.name,
                    **t.sweep_point.values,
                    "eval_loss": kept[1] if kept else None,
                    "eval_step": kept[0] if kept else None,
                    "final_train_loss": train[t.name][-1][1] if train[t.name] else None,
                    "steps": train[t.name][-1][0] if train[t.name] else 0,
                }
            )
        rows.sort(
            key=lambda r: (r["eval_loss"] is None or not math.isfinite(r["eval_loss"]), r["eval_loss"] or 0.0)
        )
        rows = [{"place": k, **row} for k, row in enumerate(rows, 1)]
        reports[group] = rows
        (output_dir / f"sweep-{group}.json").write_text(json.dumps(rows, indent=2) + "\n")
        keys = list(tasks[0].sweep_point.values)
        _plot(group, [t.name for t in tasks], keys, rows, train, evals, output_dir / f"sweep-{group}.png")
        if print_table:
            _print(group, keys, rows, output_dir)
    return reports


def _label(row: dict[str, Any], keys: list[str]) -> str:
    return " ".join(f"{k}={row[k]:g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys)


def _print(group: str, keys: list[str], rows: list[dict[str, Any]], output_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep {group!r}: {len(rows)} combinations ranked by eval loss")
    for col in ("place", *keys, "eval loss", "at step", "final train loss", "task"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for r in rows:
        values = [f"{r[k]:g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        ev = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-"
        tr = f"{r['final_train_loss']:.4f}" if r["final_train_loss"] is not None else "-"
        table.add_row(str(r["place"]), *values, ev, str(r["eval_step"] or "-"), tr, r["task"])
    console = Console()
    console.print(table)
    console.print(
        f"sweep {group!r}: {output_dir / f'sweep-{group}.png'}  {output_dir / f'sweep-{group}.json'}"
    )


def _plot(
    group: str,
    names: list[str],
    keys: list[str],
    rows: list[dict[str, Any]],
    train: dict[str, list[tuple[int, float]]],
    evals: dict[str, list[tuple[int, float]]],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(13, 4.2), dpi=110)
    cmap = plt.get_cmap("viridis")
    by_name = {r["task"]: r for r in rows}
    for name in sorted(names, key=lambda n: by_name[n]["place"]):
        row = by_name[name]
        color = cmap((row["place"] - 1) / max(1, len(rows) - 1))
        label = f"#{row['place']} {_label(row, keys)}"
        if train[name]:
            xs, ys = zip(*train[name])
            ax_t.plot(xs, ys, color=color, linewidth=1.2, alpha=0.85, label=label)
        if evals[name]:
            xs, ys = zip(*evals[name])
            ax_e.plot(xs, ys, color=color, linewidth=1.4, marker="o", markersize=3, label=label)
    ax_t.set_title(f"sweep {group}: training loss")
    ax_e.set_title("eval loss (ranked, #1 = best)")
    for ax in (ax_t, ax_e):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    ax_t.set_ylabel("loss")
    ax_e.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
