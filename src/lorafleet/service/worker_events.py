"""What a worker writes to the store about the jobs it trains: the engine's typed events (steps, evaluations,
checkpoints, status changes) as the store's records, each written under the job's lease (``Worker`` in
``worker.py`` is a ``JobRecorder``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..train.events import CheckpointEvent, EarlyStopEvent, EvalEvent, Event, StatusEvent, StepEvent
from .leases import HeldLeases
from .store import ACTIVE_STATUSES, CheckpointRecord, EventRecord, Lease, Store

__all__ = ["JobRecorder"]


class JobRecorder:
    """The engine-event half of a worker. A job's step metrics are stored as soon as the engine reports
    them, before it may checkpoint that step (one ``metrics`` event per step); an evaluation is a
    ``message`` event of its own right after it (``data``: step, valid_loss, valid_*). Events of a job the
    worker no longer leases are dropped: it no longer speaks for that job, so nothing of the worker follows
    a cancel's "Job cancelled by the user"."""

    store: Store
    engine: Any
    leases: HeldLeases
    _last_metrics: dict[str, EventRecord]  # each job's latest step event (its checkpoint's metrics)
    _saved_step: dict[str, int]  # each held job's step of its newest checkpoint

    def _write(self, job_id: str, write: Callable[[Lease | None], Any]) -> bool:
        raise NotImplementedError

    def _on_event(self, ev: Event) -> None:
        job_id = ev.task
        if isinstance(ev, StatusEvent) and ev.status == "cancelled":
            self.leases.let_go(job_id)
            return
        if self.leases.get(job_id) is None:
            return  # a job this worker let go of: it no longer speaks for it
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
            if self._write(job_id, lambda lease: self.store.add_events([rec], lease)):
                self._write(
                    job_id,
                    lambda lease: self.store.update_progress(
                        job_id, ev.step, st.total_steps, st.tokens, lease
                    ),
                )
            return
        if isinstance(ev, EvalEvent):
            # the evaluation after a step is its own event, after that step's metrics event: the list is
            # append-only, so a reader that already read the step's event misses nothing
            valid = {f"valid_{k[5:]}": v for k, v in ev.record().items() if k.startswith("eval_")}
            rec = EventRecord(
                job_id, "message", f"Step {ev.step}: validation loss={ev.loss:.4f}", time.time(),
                data={"step": ev.step, **valid},
            )  # fmt: skip
            self._write(job_id, lambda lease: self.store.add_events([rec], lease))
            return
        now = time.time()
        if isinstance(ev, CheckpointEvent):
            last = self._last_metrics.get(job_id)
            metrics = {"train_loss": last.data["train_loss"]} if last is not None else {}
            ck = CheckpointRecord(job_id, ev.step, ev.path, now, metrics)
            if self._write(job_id, lambda lease: self.store.add_checkpoint(ck, lease)):
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
                started: list[bool] = []
                self._write(
                    job_id,
                    lambda lease: started.append(
                        self.store.transition(job_id, "running", ["queued"], lease, started_at=now)
                    ),
                )
                if any(started):
                    self._event(job_id, "Training started")
            elif status == "succeeded":
                st = self.engine.state(job_id)
                done: list[bool] = []
                self._write(
                    job_id,
                    lambda lease: done.append(
                        self.store.transition(
                            job_id,
                            "succeeded",
                            ["queued", "running", "paused"],
                            lease,
                            finished_at=now,
                            step=st.step,
                            total_steps=st.total_steps,
                            trained_tokens=st.tokens,
                        )  # fmt: skip
                    ),
                )
                if any(done):
                    job = self.store.get_job_any(job_id)
                    self._event(
                        job_id, f"Training succeeded: adapter {job.adapter_id if job else '?'} is ready",
                        lease=False,
                    )  # fmt: skip
                self.leases.let_go(job_id)
            elif status == "failed":
                self._fail(job_id, ev.error or "training failed")
                self.leases.let_go(job_id)

    def _event(self, job_id: str, message: str, level: str = "info", lease: bool = True) -> None:
        rec = EventRecord(job_id, "message", message, time.time(), level=level)
        if lease and self.leases.get(job_id) is not None:
            self._write(job_id, lambda held: self.store.add_events([rec], held))
        else:  # a job not (or no longer) leased: validation, or the last word after it finished
            self.store.add_events([rec])

    def _fail(self, job_id: str, message: str) -> None:
        failed: list[bool] = []
        if self.leases.get(job_id) is None:
            failed.append(
                self.store.transition(
                    job_id, "failed", ACTIVE_STATUSES, finished_at=time.time(), error=message
                )
            )
        else:
            self._write(
                job_id,
                lambda lease: failed.append(
                    self.store.transition(
                        job_id, "failed", ACTIVE_STATUSES, lease, finished_at=time.time(), error=message
                    )
                ),
            )
        if any(failed):
            self._event(job_id, f"Job failed: {message}", level="error", lease=False)
