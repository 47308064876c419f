"""``lorafleet train``: load a config, train every task together, print the summary.

lorafleet train examples/demo.yaml
lorafleet train examples/demo.yaml --nproc 2     # a 2-stage pipeline (starts torchrun)

The output folder is checked and locked first (``train/outdir.py``): a second run on it is refused. SIGTERM
and SIGINT complete the optimizer steps under way, checkpoint every task, print the summary and exit with
143 / 130 (a second signal ends the process at once; checkpoints are atomic, so that is safe too).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..config import load_config
from ..model_paths import check_model_path
from .outdir import lock_output_dir
from .sweep import sweep_report

__all__ = ["TrainingInterrupted", "cli_train", "print_summary", "train"]

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """``train`` stopped on a signal after checkpointing every task; ``states`` as they were then."""

    def __init__(self, signum: int, states: dict) -> None:
        name = signal.Signals(signum).name
        steps = ", ".join(
            f"{n}: step {st.step}" for n, st in states.items() if st.status in ("queued", "running")
        )
        super().__init__(
            f"interrupted by {name}: the optimizer steps under way were completed and every unfinished task "
            f"was checkpointed ({steps or 'none left'}); run the same command again to resume."
        )
        self.signum, self.states = signum, states

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _stop_on_signals(engine) -> dict:
    """Route SIGTERM/SIGINT to ``engine.request_stop`` (a second one exits at once); the old handlers."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, _frame):
        if engine.stop_signal is not None:
            os._exit(128 + signum)
        engine.request_stop(signum)

    return {s: signal.signal(s, handler) for s in _STOP_SIGNALS}


def _already_finished(st) -> bool:
    """The task had finished in an earlier run: this one resumed it from its last step and trained nothing."""
    return st.status == "succeeded" and st.resumed_from is not None and st.resumed_from == st.step


def print_summary(states: dict, output_dir: Path) -> None:
    """A table of task, status, steps, final loss and tokens/s; where the outputs are.

    A task that had already finished in an earlier run (resumed from its final checkpoint, nothing left to
    train) is marked so, with its last figures from ``metrics.jsonl`` (loss, tokens/s of the run that
    trained it), and a line says that nothing was trained.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from ..metrics import read_metrics, summary_rows

    done = [name for name, st in states.items() if _already_finished(st)]
    earlier = {r["task"]: r for r in summary_rows(read_metrics(output_dir / "metrics.jsonl"))} if done else {}
    table = Table(title="lorafleet summary")
    for col in ("task", "status", "steps", "final loss", "tokens", "tokens/s"):
        table.add_column(col, justify="left" if col in ("task", "status") else "right")
    for name, st in states.items():
        loss = st.last_loss
        tps = st.tokens / st.busy_s if st.busy_s > 0 else None
        status = st.status
        if name in done:
            status = "done earlier"
            rec = earlier.get(name, {})
            # checkpoints from before last_loss / busy_s were kept: the figures of metrics.jsonl
            loss = loss if loss is not None else rec.get("final_loss")
            tps = tps or rec.get("tokens_per_s") or None
        loss_s = f"{loss:.4f}" if loss is not None else "-"
        tps_s = f"{tps:,.0f}" if tps else "-"
        table.add_row(name, status, f"{st.step}/{st.total_steps}", loss_s, f"{st.tokens:,}", tps_s)
    console = Console()
    console.print(table)
    for name, st in states.items():
        if st.error:
            console.print(f"[red]{name} failed:[/red] {st.error}")
    if done:
        where = escape(str(output_dir / "checkpoints"))
        if len(done) == len(states):
            console.print(
                f"Nothing left to train: every task had already finished in an earlier run; this run resumed "
                f"each from its final checkpoint in {where} and trained no step. The figures are that run's. "
                f"To train again, delete {where} or set another output_dir."
            )
        else:
            console.print(
                f"Already finished in an earlier run (resumed from the final checkpoint, nothing left to "
                f"train): {escape(', '.join(done))}."
            )
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

    lock = lock_output_dir(cfg.output_dir)
    try:
        engine = Engine(cfg)
        previous = _stop_on_signals(engine)
        try:
            states = engine.run(progress=progress)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        print_summary(states, Path(cfg.output_dir))
        if engine.stop_signal is not None:
            raise TrainingInterrupted(engine.stop_signal, states)
        sweep_report(cfg, cfg.output_dir)  # sweeps only: ranking table, sweep-<task>.png and .json
        return states
    finally:
        lock.release()


def launch_pipeline(config_path: str | Path, nproc: int, progress: bool) -> int:
    """``lorafleet train CONFIG --nproc P``: run torchrun on this machine with P processes; its exit code."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: give the number of pipeline processes, at least 1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "lorafleet", "train", str(config_path)] + ([] if progress else ["--no-progress"])
    cfg = load_config(config_path)
    check_model_path(cfg.base_model.path)  # a bad path: one error here, not one per stage + torchrun's
    lock = lock_output_dir(cfg.output_dir)  # the stages run under this hold
    try:
        return subprocess.call(cmd)
    finally:
        lock.release()


def cli_train(args: argparse.Namespace) -> int:
    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc != 1 and "WORLD_SIZE" not in os.environ:
        return launch_pipeline(args.config, nproc, progress=not args.no_progress)
    from .events import TrainerFailed  # a pipeline stage died (parallel.PipelineError)

    try:
        states = train(args.config, progress=not args.no_progress)
    except TrainingInterrupted as e:
        print(f"lorafleet train: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except TrainerFailed as e:
        # Threads still block on links to the failed stage, so leave at once rather than wait for them.
        print(f"lorafleet train: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    return 1 if any(st.status == "failed" for st in states.values()) else 0
