"""The worker: the one process that trains. It feeds the store's jobs to one ``Engine`` and writes back what
happens.

    python -m lorafleet.service.worker --data-dir ./service-data --base-model path/to/model   # CPU example
    (``lorafleet serve`` starts it for you, next to the API, and restarts it if it dies.)

Loop, top to bottom:

1. every ``poll_interval`` seconds (and whenever the engine is idle) read the store:
   - jobs in ``validating_files``: check their files and settings; ``queued``, or ``failed`` with why;
   - jobs in ``queued`` or ``running`` that the engine does not hold yet: ``Engine.add_task`` (online
     arrival: the others keep training). The engine resumes a task from ``checkpoints/<job id>/`` when it
     holds checkpoints, so after a crash or SIGKILL every unfinished job goes on from its last checkpoint;
   - jobs the engine holds that the store says are ``cancelled``: ``Engine.cancel_task``;
   - jobs the engine holds that the store says are ``paused``: they leave the engine (``cancel_task``, the
     store keeps ``paused``) right after their next checkpoint, or at once when nothing was trained since
     their last one; ``resume`` puts them back to ``queued`` and they are admitted again from it;
2. one decode step for every inference request in flight (``inference.py``: chat and completions, all
   tenants in one continuous batch, each row its own adapter), then ``Engine.run_once()``: one fused
   micro-batch over all running jobs (plus due optimizer steps). So a decode step waits for at most one
   training micro-batch, and training goes on while requests are served;
3. the engine's events (steps, status changes, checkpoints) go to the store as they happen, each before the
   engine goes on: a step's metrics are stored before that step's checkpoint is written, so a worker killed
   at any moment loses no step that its checkpoints hold (a resumed job trains the steps after its last
   checkpoint again, and their metrics events replace the earlier ones).

Only one worker may run per data folder: it holds an exclusive ``flock`` on ``DATA_DIR/worker.lock`` (the
kernel releases it when the process dies, even by SIGKILL). A heartbeat thread writes the worker's state to
the store every second for ``/healthz``. On Linux the worker asks the kernel to kill it when the
``lorafleet serve`` process that started it dies, and it also exits when its parent changes.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..train.events import CheckpointEvent, EarlyStopEvent, EvalEvent, Event, StatusEvent, StepEvent
from .files import DataDir
from .jobspec import EngineSettings, job_configs
from .store import ACTIVE_STATUSES, CheckpointRecord, EventRecord, SQLiteStore, Store

__all__ = ["Worker", "build_parser", "main"]

log = logging.getLogger("lorafleet.worker")

_HEARTBEAT_S = 1.0


class Worker:
    """Runs jobs from ``store`` on one engine (see the module docstring)."""

    def __init__(
        self, store: Store, data_dir: DataDir, settings: EngineSettings, poll_interval: float = 0.5,
        serve_inference: bool = True, adapter_cache_bytes: int = 1 << 30, max_inference_rows: int = 64,
    ) -> None:  # fmt: skip
        self.store = store
        self.serve_inference = serve_inference
        self.adapter_cache_bytes = adapter_cache_bytes
        self.max_inference_rows = max_inference_rows
        self.inference: Any = None  # the InferenceServer, once the engine holds the model
        self._wake = threading.Event()  # set when an inference request arrives
        self.dd = data_dir
        self.settings = settings
        self.poll_interval = poll_interval
        self.engine: Any = None
        self._held: set[str] = set()  # job ids the engine holds and still trains (queued/running there)
        self._last_metrics: dict[str, EventRecord] = {}  # each job's latest step event, which its eval joins
        self._saved_step: dict[str, int] = {}  # each held job's step of its newest checkpoint
        self._pausing: set[str] = set()  # held jobs the store paused: they leave at their next checkpoint
        self.state = "starting"
        self.message = ""

    # -- the loop ---------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Train until ``stop`` is set."""
        self._load_engine()
        if self.serve_inference:
            self._start_inference()
        next_sync = 0.0
        try:
            while not stop.is_set():
                serving = self.inference is not None and self.inference.busy
                if time.monotonic() >= next_sync or not (self._held or serving):
                    self.sync()
                    next_sync = time.monotonic() + self.poll_interval
                served = self.inference.step() if serving else False  # one decode step for all requests
                busy = self._step() if self._held else False  # then at most one training micro-batch
                self._leave_paused()
                if not (busy or served or (self.inference is not None and self.inference.busy)):
                    self._wake.wait(self.poll_interval)
                    self._wake.clear()
        finally:
            if self.inference is not None:
                self.inference.close()
            self.engine.metrics.close()

    def _start_inference(self) -> None:
        from .inference import InferenceServer

        self.inference = InferenceServer(
            self.engine.model, self.engine.tokenizer, self.dd.inference_socket, self.adapter_cache_bytes,
            self.max_inference_rows, wake=self._wake,
        )  # fmt: skip
        self.inference.start()

    def _load_engine(self) -> None:
        from ..train.engine import Engine

        self.state = "loading"
        cfg = self.settings.run_config(self.dd.engine)
        self.engine = Engine(cfg, tensorboard=False)
        self.engine.subscribe(self._on_event)
        self.state = "ready"
        log.info("engine ready: %s on %s", self.settings.base_model, self.engine.device)

    def _step(self) -> bool:
        try:
            return self.engine.run_once()
        except Exception as e:  # a fault of the engine, not of one job: fail the jobs it was training
            log.exception("engine failed")
            msg = f"the training engine failed: {type(e).__name__}: {e}"
            for job_id in sorted(self._held):
                st = self.engine.state(job_id)
                if st.status == "running":
                    self._fail(job_id, msg)
                    self._held.discard(job_id)
                    try:
                        self.engine.cancel_task(job_id)
                    except Exception:
                        log.exception("could not drop %s from the engine", job_id)
            return False

    # -- reading the store ------------------------------------------------------------------------------

    def sync(self) -> None:
        """Validate new jobs, hand queued ones to the engine, cancel the ones the store cancelled."""
        for job in self.store.jobs_with_status(["validating_files"]):
            self._validate(job)
        for job in self.store.jobs_with_status(["queued", "running"]):
            if job.id not in self._held and job.id not in self.engine.states:
                self._admit(job)
        for job_id in sorted(self._held):
            job = self.store.get_job_any(job_id)
            if job is None or job.status not in ACTIVE_STATUSES:
                self.engine.cancel_task(job_id)
                self._held.discard(job_id)
            elif job.status == "paused" and job_id not in self._pausing:
                self._pausing.add(job_id)
                if self.engine.state(job_id).step == self._saved_step.get(job_id, 0):
                    self._leave_paused(now=job_id)
        # finished jobs live on in the store; the engine lets go of their data so it does not grow
        for name, st in list(self.engine.states.items()):
            if name not in self._held and st.status not in ("queued", "running"):
                self.engine.forget(name)
                self._last_metrics.pop(name, None)
                self._saved_step.pop(name, None)

    def _configs(self, job):
        files = {}
        for key in ("training_file", "validation_file"):
            fid = job.spec.get(key)
            if fid:
                rec = self.store.get_file(job.tenant, fid)
                path = self.dd.file_path(fid)
                if rec is None or not path.is_file():
                    raise ValueError(f"{key} {fid} was deleted; upload it again and create a new job")
                files[fid] = (path, rec.format)
        return job_configs(job.spec, job.id, job.adapter_id, files, self.settings, self.dd.engine), files

    def _validate(self, job) -> None:
        from ..data.sources import read_rows

        try:
            cfgs, files = self._configs(job)
            for ds in (cfgs.dataset, cfgs.eval_dataset):
                if ds is not None:
                    read_rows(ds.path)
        except ValueError as e:
            self._fail(job.id, _public(str(e), self.dd))
            return
        if self.store.transition(job.id, "queued", ["validating_files"]):
            self._event(job.id, "Files validated; job queued")

    def _admit(self, job) -> None:
        try:
            cfgs, _ = self._configs(job)
            self.engine.add_task(cfgs.dataset, cfgs.adapter, cfgs.task, cfgs.eval_dataset)
        except ValueError as e:  # bad data or settings: the job's fault
            self._fail(job.id, _public(str(e), self.dd))
            return
        except Exception as e:
            log.exception("could not start %s", job.id)
            self._fail(job.id, f"could not start the job: {type(e).__name__}: {_public(str(e), self.dd)}")
            return
        st = self.engine.state(job.id)
        if st.status in ("queued", "running"):
            self._held.add(job.id)
            self._saved_step[job.id] = st.step  # a resumed job starts at its checkpoint
        self.store.update_progress(job.id, st.step, st.total_steps, st.tokens)
        if st.step > 0:
            self._event(job.id, f"Resumed from the checkpoint at step {st.step} of {st.total_steps}")

    def _leave_paused(self, now: str | None = None) -> None:
        """Take paused jobs off the engine once their newest checkpoint holds all they trained."""
        for job_id in sorted(self._pausing):
            if job_id not in self._held:
                self._pausing.discard(job_id)
                continue
            step = self.engine.state(job_id).step
            if job_id == now or self._saved_step.get(job_id, 0) == step:
                self.engine.cancel_task(job_id)
                self._held.discard(job_id)
                self._pausing.discard(job_id)
                self._event(job_id, f"Paused at step {step}; resume continues from there")

    # -- engine events ----------------------------------------------------------------------------------

    def _on_event(self, ev: Event) -> None:
        job_id = ev.task
        if isinstance(ev, StepEvent):
            st = self.engine.state(job_id)
            data = {
                "step": ev.step,
                "train_loss": ev.loss,
                "learning_rate": ev.lr,
                "tokens": ev.tokens,
                "elapsed_s": ev.elapsed_s,
            }
            # the task's own numbers (grad_norm; preference rewards and accuracies), as they are
            data.update(ev.metrics)
            if ev.grad_norm is not None:
                data["grad_norm"] = ev.grad_norm
            rec = EventRecord(
                job_id, "metrics", f"Step {ev.step}/{st.total_steps}: training loss={ev.loss:.4f}",
                time.time(), step=ev.step, data=data,
            )  # fmt: skip
            self._last_metrics[job_id] = rec
            # stored now, before the engine may checkpoint this step
            self.store.add_events([rec])
            self.store.update_progress(job_id, ev.step, st.total_steps, st.tokens)
            return
        if isinstance(ev, EvalEvent):
            # the evaluation after a step joins that step's metrics event (valid_loss, valid_*): the store
            # replaces the metrics event of a job and step with the later one
            valid = {f"valid_{k[5:]}": v for k, v in ev.record().items() if k.startswith("eval_")}
            rec = self._last_metrics.get(job_id)
            if rec is not None and rec.step == ev.step:
                rec.data.update(valid)
                rec.message += f", validation loss={ev.loss:.4f}"
                self.store.add_events([rec])
                return
            self.store.add_events([
                EventRecord(
                    job_id, "message", f"Step {ev.step}: validation loss={ev.loss:.4f}", time.time(),
                    data={"step": ev.step, **valid},
                )
            ])  # fmt: skip
            return
        now = time.time()
        if isinstance(ev, CheckpointEvent):
            last = self._last_metrics.get(job_id)
            metrics = {"train_loss": last.data["train_loss"]} if last is not None else {}
            self.store.add_checkpoint(CheckpointRecord(job_id, ev.step, ev.path, now, metrics))
            self._saved_step[job_id] = ev.step
            self._event(job_id, f"Checkpoint saved at step {ev.step}")
        elif isinstance(ev, EarlyStopEvent):
            self._event(
                job_id,
                f"Early stopping at step {ev.step}: the best validation loss was at step {ev.best_step}",
            )
        elif isinstance(ev, StatusEvent):
            status = ev.status
            if status == "running":
                if self.store.transition(job_id, "running", ["queued"], started_at=now):
                    self._event(job_id, "Training started")
            elif status == "succeeded":
                st = self.engine.state(job_id)
                done = self.store.transition(
                    job_id, "succeeded", ["queued", "running", "paused"], finished_at=now, step=st.step,
                    total_steps=st.total_steps, trained_tokens=st.tokens,
                )  # fmt: skip
                if done:
                    job = self.store.get_job_any(job_id)
                    self._event(
                        job_id, f"Training succeeded: adapter {job.adapter_id if job else '?'} is ready"
                    )
                self._held.discard(job_id)
            elif status == "failed":
                self._fail(job_id, ev.error or "training failed")
                self._held.discard(job_id)
            elif status == "cancelled":
                self._held.discard(job_id)

    def _event(self, job_id: str, message: str, level: str = "info") -> None:
        self.store.add_events([EventRecord(job_id, "message", message, time.time(), level=level)])

    def _fail(self, job_id: str, message: str) -> None:
        if self.store.transition(job_id, "failed", ACTIVE_STATUSES, finished_at=time.time(), error=message):
            self._event(job_id, f"Job failed: {message}", level="error")


def _public(message: str, dd: DataDir) -> str:
    """A message without the server's folders: file paths become their file ids."""
    for folder in (dd.files, dd.engine, dd.root):
        message = message.replace(f"{folder.resolve()}/", "").replace(f"{folder}/", "")
    return re.sub(r"\b(file-[0-9a-f]{24})\.jsonl\b", r"\1", message)


def _heartbeat(store: Store, worker: Worker, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            store.set_meta(
                "worker",
                {
                    "state": worker.state,
                    "pid": os.getpid(),
                    "time": time.time(),
                    "active_jobs": len(worker._held),
                    "message": worker.message,
                    "inference": dict(worker.inference.stats) if worker.inference is not None else None,
                },
            )
        except Exception:  # the store may be briefly locked; the next beat retries
            log.exception("heartbeat failed")
        stop.wait(_HEARTBEAT_S)


def _die_with_parent(parent_pid: int, stop: threading.Event) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while not stop.is_set():
            if os.getppid() != parent_pid:
                log.warning("parent %d is gone; stopping", parent_pid)
                stop.set()
            stop.wait(1.0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _lock(dd: DataDir, stop: threading.Event) -> int:
    fd = os.open(dd.lock, os.O_RDWR | os.O_CREAT, 0o644)
    warned = False
    while not stop.is_set():
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        except BlockingIOError:
            if not warned:
                log.warning("another worker holds %s; waiting for it to exit", dd.lock)
                warned = True
            stop.wait(0.5)
    return fd


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lorafleet.service.worker", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--data-dir", required=True)
    p.add_argument("--base-model", required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--max-concurrent-tasks", type=int, default=8)
    p.add_argument("--max-tokens-per-micro-batch", type=int, default=4096)
    p.add_argument("--poll-interval", type=float, default=0.5)
    p.add_argument(
        "--adapter-cache-mb", type=float, default=1024.0, help="inference adapters kept loaded (LRU)"
    )
    p.add_argument("--max-inference-rows", type=int, default=64, help="requests decoded together at most")
    p.add_argument("--no-inference", action="store_true", help="train only: no chat/completions")
    p.add_argument("--num-threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument(
        "--parent-pid", type=int, default=None, help="exit when this process is no longer the parent"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid, stop)
    if args.num_threads is not None:
        import torch

        torch.set_num_threads(args.num_threads)
    dd = DataDir(Path(args.data_dir)).create()
    lock_fd = _lock(dd, stop)
    if stop.is_set():
        return 0
    store = SQLiteStore(dd.db)
    settings = EngineSettings(
        base_model=args.base_model, dtype=args.dtype, device=args.device,
        max_concurrent_tasks=args.max_concurrent_tasks, max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
    )  # fmt: skip
    worker = Worker(
        store, dd, settings, poll_interval=args.poll_interval, serve_inference=not args.no_inference,
        adapter_cache_bytes=int(args.adapter_cache_mb * 1024 * 1024), max_inference_rows=args.max_inference_rows,
    )  # fmt: skip
    beat = threading.Thread(target=_heartbeat, args=(store, worker, stop), daemon=True, name="heartbeat")
    beat.start()
    try:
        worker.run(stop)
        worker.state = "stopped"
    except Exception as e:
        worker.state, worker.message = "error", f"{type(e).__name__}: {e}"
        log.exception("worker stopped")
        return 1
    finally:
        stop.set()
        beat.join(timeout=10)
        # the last word for /healthz: time 0, so a stopped or failed worker never reads as alive
        last = {"state": worker.state, "pid": os.getpid(), "time": 0.0, "message": worker.message}
        store.set_meta("worker", last)
        os.close(lock_fd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
