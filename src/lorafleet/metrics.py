"""Metrics: one JSON object per task step (``metrics.jsonl``), TensorBoard scalars, summary table, loss plot.

TensorBoard (``torch.utils.tensorboard``) and matplotlib take seconds to import, which a run would otherwise
spend before its first step and after its last. So both are imported on background threads, started once the
first step is under way (``MetricsWriter.start_background``, ``prefetch_plotting``): an import holds the GIL
most of the time, so a thread started earlier delays the first step, while during a step the main thread
mostly waits in GEMMs, which release it. The TensorBoard writer lives on its own thread (``write`` hands it
the records; ``close`` waits for it to write them all); ``plot_curves`` at the end finds matplotlib loaded.
"""

from __future__ import annotations

import errno
import importlib.metadata
import json
import logging
import os
import queue
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["MetricsWriter", "plot_curves", "prefetch_plotting", "read_metrics", "summary_rows"]

_STOP = object()
_log = logging.getLogger(__name__)


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

    A write the disk refuses (full, over quota, an I/O error) does not stop training: the bytes not written
    stay in memory, a warning names the error, and every later ``write`` (and ``close``) tries them again
    first, so once the disk takes them the file holds every record once, in order, with no torn line (a
    write cut short is completed from where it stopped). ``close`` warns of what it still could not write.
    """

    def __init__(self, output_dir: Path, tensorboard: bool = True) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self._fd = _open_append(self.path)
        self._pending = b""  # bytes written by no os.write yet (the disk refused them)
        self._refused: OSError | None = None  # the error of the last refused write, until one succeeds
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
        self._pending += (json.dumps(record) + "\n").encode()
        self._drain()
        if self._tb is not None and "task" in record and "step" in record:
            self._tb.records.put(dict(record))

    @property
    def pending_bytes(self) -> int:
        """Bytes of records the disk has refused so far and that are still to be written."""
        return len(self._pending)

    def _drain(self) -> bool:
        """Write the pending bytes; False (and a warning, once per fault) when the disk refuses them."""
        while self._pending:
            try:
                n = os.write(self._fd, self._pending)
                if n == 0:  # a regular file takes a byte or raises; never loop on nothing written
                    raise OSError(errno.EIO, "the write took no bytes")
            except OSError as e:
                if self._refused is None:
                    _log.warning(
                        "%s: could not write (%s); its records are kept and written once it can", self.path, e
                    )
                self._refused = e
                return False
            self._pending = self._pending[n:]
        if self._refused is not None:
            _log.warning("%s: writable again; the records it refused are written", self.path)
            self._refused = None
        return True

    def truncate(self, task: str, step: int) -> int:
        """Drop ``task``'s records after ``step`` (and any cut-short line); how many lines were dropped.

        A resumed task redoes the steps after its checkpoint, so their records from the run that was
        interrupted must go: ``metrics.jsonl`` then holds exactly one record per step.
        """
        if not self._drain():
            raise self._refused
        lines = self.path.read_text().splitlines(keepends=True)
        keep = [line for line in lines if _kept(line, task, step)]
        if len(keep) == len(lines):
            return 0
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.close(self._fd)
        os.replace(tmp, self.path)
        self._fd = _open_append(self.path)
        return len(lines) - len(keep)

    def close(self) -> None:
        if self._fd < 0:
            return
        if not self._drain():
            _log.error(
                "%s: %d bytes of records could not be written (%s); the adapters and checkpoints are not "
                "affected", self.path, len(self._pending), self._refused,
            )  # fmt: skip
        os.close(self._fd)
        self._fd = -1
        if self._tb is not None:
            tb, self._tb = self._tb, None
            if tb.ident is None:  # no step ran: the records written so far still reach the event file
                tb.start()
            tb.records.put(_STOP)
            tb.join()
            if tb.error is not None:
                raise RuntimeError(f"TensorBoard logging failed: {tb.error}") from tb.error


def _open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)


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
