"""Metrics: one JSON object per task step (``metrics.jsonl``), TensorBoard scalars, summary table, loss plot.

TensorBoard (``torch.utils.tensorboard``) and matplotlib take seconds to import, which a run would otherwise
spend before its first step and after its last. So both are imported on background threads, started once the
first step is under way (``MetricsWriter.start_background``, ``prefetch_plotting``): an import holds the GIL
most of the time, so a thread started earlier delays the first step, while during a step the main thread
mostly waits in GEMMs, which release it. The TensorBoard writer lives on its own thread (``write`` hands it
the records; ``close`` waits for it to write them all); ``plot_curves`` at the end finds matplotlib loaded.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import queue
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["MetricsWriter", "plot_curves", "prefetch_plotting", "read_metrics", "summary_rows"]

_STOP = object()


class _TensorBoardThread(threading.Thread):
    """Imports TensorBoard, then writes the scalars of every record it is given until ``_STOP``."""

    def __init__(self, folder: Path) -> None:
        super().__init__(name="lorafleet-tensorboard", daemon=True)
        self.folder = folder
        self.records: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None

    def run(self) -> None:
        writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.folder))
            while (record := self.records.get()) is not _STOP:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key != "step":
                        writer.add_scalar(f"{record['task']}/{key}", value, record["step"])
        except BaseException as e:  # reported by close(), in the caller's thread
            self.error = e
        finally:
            if writer is not None:
                writer.close()


class MetricsWriter:
    """Appends step records to ``metrics.jsonl`` and mirrors numbers into TensorBoard (``tb/``).

    The TensorBoard side runs on a background thread (see the module docstring); ``close`` waits until it
    has written every record and re-raises what it failed with.
    """

    def __init__(self, output_dir: Path, tensorboard: bool = True) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self._fh = open(self.path, "a", buffering=1)
        self._tb: _TensorBoardThread | None = None
        if tensorboard:
            try:  # installed? (asked of the package metadata: this imports nothing)
                importlib.metadata.distribution("tensorboard")
            except importlib.metadata.PackageNotFoundError:
                raise RuntimeError(
                    "TensorBoard logging needs the tensorboard package: pip install tensorboard"
                ) from None
            self._tb = _TensorBoardThread(output_dir / "tb")  # started by start_background (or close)

    def start_background(self) -> None:
        """Start the TensorBoard thread (idempotent: trainers call it at every step; see the module docstring)."""
        if self._tb is not None and self._tb.ident is None:
            self._tb.start()

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        if self._tb is not None and "task" in record and "step" in record:
            self._tb.records.put(dict(record))

    def truncate(self, task: str, step: int) -> int:
        """Drop ``task``'s records after ``step`` (and any cut-short line); how many lines were dropped.

        A resumed task redoes the steps after its checkpoint, so their records from the run that was
        interrupted must go: ``metrics.jsonl`` then holds exactly one record per step.
        """
        self._fh.flush()
        lines = self.path.read_text().splitlines(keepends=True)
        keep = [line for line in lines if _kept(line, task, step)]
        if len(keep) == len(lines):
            return 0
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(keep))
        self._fh.close()
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a", buffering=1)
        return len(lines) - len(keep)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            tb, self._tb = self._tb, None
            if tb.ident is None:  # no step ran: the records written so far still reach the event file
                tb.start()
            tb.records.put(_STOP)
            tb.join()
            if tb.error is not None:
                raise RuntimeError(f"TensorBoard logging failed: {tb.error}") from tb.error


def _kept(line: str, task: str, step: int) -> bool:
    if not line.endswith("\n"):
        return False  # the tail of a write that a kill cut short
    try:
        rec = json.loads(line)
    except ValueError:
        return False
    return not (isinstance(rec, dict) and rec.get("task") == task and rec.get("step", 0) > step)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task: steps, first and final loss, tokens and tokens/s over its own training time."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if "loss" in r and "task" in r and r.get("kind", "train") == "train":
            by_task[r["task"]].append(r)
    rows = []
    for task, rs in by_task.items():
        tokens = sum(r.get("tokens", 0) for r in rs)
        elapsed = max(r.get("elapsed_s", 0.0) for r in rs)
        rows.append(
            {
                "task": task,
                "steps": rs[-1]["step"],
                "first_loss": rs[0]["loss"],
                "final_loss": rs[-1]["loss"],
                "tokens": tokens,
                "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            }
        )
    return rows


_prefetch_lock = threading.Lock()
_prefetched: threading.Thread | None = None


def _import_plotting() -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot
    except Exception:  # plot_curves imports it again and reports the error where it is needed
        pass


def prefetch_plotting() -> None:
    """Import matplotlib (Agg) on a background thread, once per process, for ``plot_curves`` later."""
    global _prefetched
    with _prefetch_lock:
        if _prefetched is None:
            _prefetched = threading.Thread(target=_import_plotting, name="lorafleet-plotting", daemon=True)
            _prefetched.start()


def plot_curves(
    records: list[dict[str, Any]], path: Path, key: str = "loss", title: str = "training loss"
) -> None:
    """One line per task of ``key`` against step, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for r in records:
        if key in r and "task" in r and "step" in r:
            series[r["task"]][0].append(r["step"])
            series[r["task"]][1].append(r[key])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for task, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, label=task, linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
