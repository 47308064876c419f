"""The explicit multi-task training loop for one process.

    lorafleet train examples/demo.yaml          # CPU, the bundled SmolLM2 and four chatterbot adapters

One ``Engine`` holds the frozen base model once and any number of tasks, each with its own adapter, data,
batch size, optimizer, schedule and checkpoints. Each call of ``run_once``:

1. asks the dispatcher (pure policy, ``train/dispatcher.py``) which tasks' next examples form the fused
   micro-batch, within the token budget and the concurrency limit;
2. packs them into one ``FusedBatch`` (each task's sequences contiguous, so each adapter owns one segment);
3. runs the base model once over the whole batch, computes each task's loss on its own sequences only
   (``train/tasks.py``: sft, dpo and kto with their frozen reference as rows of the same batch, orpo), and runs
   one backward for the sum (adapters share no parameters, so each adapter's gradient is exactly the one
   it would get alone);
4. steps the optimizer of every task whose optimizer step is now complete and logs it; evaluates, in fused
   batches, the tasks whose evaluation is due (``eval_every_steps``, and after the last step) and applies
   early stopping; checkpoints, and finishes tasks that reached their last step or ran out of patience
   (their adapter is written in PEFT's format: with early stopping, the one of the best evaluation).

What a step is (denominators, accumulation, clipping, the optimizer and schedule, evaluation, checkpoints,
resume) is the ``Task``'s (``train/task.py``), shared with every pipeline stage: the engine only decides
which micro-batch runs. A task whose loss or weights become NaN/inf fails alone; the others go on. A task
whose checkpoint or final adapter cannot be written (a storage fault, ``OSError``) is held and its write
retried with backoff (``Engine.storage``, a ``StorageHolds`` with its ``StorageRetry`` policy: ``train/storage.py``);
it fails only when the tries run out.
Subscribers receive typed events (``train/events.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..batch import FusedBatch
from ..config import AdapterConfig, DatasetConfig, RunConfig, TaskConfig
from ..data.packing import pack
from ..devices import resolve_device
from ..metrics import MetricsWriter, prefetch_plotting
from ..models import base_dtype, load_model
from ..models.recompute import apply_recompute, remove_recompute
from ..models.tokenizer import load_tokenizer
from .dispatcher import PlanItem, next_waited, plan_next
from .evaluate import evaluate
from .events import Event, StatusEvent, StepEvent, StorageFaultEvent
from .storage import StorageHolds, StorageRetry
from .task import STATUSES, Task, TaskState
from .tasks import order_groups, pack_groups
from .trainer import deliver, require_new_task_name

__all__ = ["STATUSES", "Engine", "TaskState", "pack_plan", "plan_micro_batch", "resolve_device"]

_log = logging.getLogger("lorafleet.train")


def plan_micro_batch(
    live: list[Task], cfg: RunConfig, waited: dict[str, int]
) -> tuple[list[PlanItem], dict[str, int]]:
    """The dispatcher's next fused micro-batch over ``live`` tasks, and the updated fairness counts.

    Shared by the engine and the pipeline's first stage, so both schedule exactly alike.
    """
    views = [t.view(waited.get(t.name, 0)) for t in live]
    limit = cfg.dispatcher.max_concurrent_tasks
    plan = plan_next(views, max_tokens=cfg.dispatcher.max_tokens_per_micro_batch, max_concurrent=limit)
    return plan, next_waited(views, plan, max_concurrent=limit)


def pack_plan(plan: list[PlanItem], tasks: dict[str, Task], device) -> FusedBatch:
    """The fused micro-batch of a dispatcher plan: one segment per task, in plan order, then base-only rows.

    Each task kind says which sequences an example becomes (``train/tasks.py``); reference rows (a DPO or
    KTO task's frozen reference adapter, or the bare base) go after every task's own segment.
    """
    own, refs = [], []
    for item in plan:
        t = tasks[item.task]
        items = [(p, t.example_at(p)) for p in item.examples]
        # each sequence gets its dropout key from its example's place in the data order and its role
        group, ref = pack_groups(t.name, t.spec.name, t.kind, items, key=t.dropout_key, reference=t.reference)
        own.append(group)
        refs += [ref] if ref is not None else []
    return pack(order_groups(own, refs), device)


class Engine:
    """Trains every task of a ``RunConfig`` together on one base model (see the module docstring); a
    ``Trainer`` (``train/trainer.py``)."""

    def __init__(
        self,
        cfg: RunConfig,
        model=None,
        tokenizer=None,
        tensorboard: bool = True,
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.base_model.device)
        dtype = base_dtype(cfg.base_model.dtype)
        self.model = model if model is not None else load_model(cfg.base_model.path, dtype, self.device)
        if model is None and cfg.base_model.quantize is not None:
            from ..models.quant import quantize_model

            quantize_model(self.model, cfg.base_model.quantize)
        self.model.train()  # adapter dropout is active in training mode only (evaluation switches to eval)
        # adapter dropout masks are keyed per task and sequence (pack_plan, lorafleet.masks): no RNG state
        # per-layer activation checkpointing as the config says (also on a model the caller passed in)
        (apply_recompute if cfg.recompute else remove_recompute)(self.model)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.base_model.path)
        self.output_dir = Path(cfg.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsWriter(self.output_dir, tensorboard=tensorboard)
        self._tasks: dict[str, Task] = {}
        self._subscribers: list[Callable[[Event], None]] = []
        self._arrivals = 0
        self._waited: dict[str, int] = {}  # micro-batches each task was left out of (dispatcher fairness)
        self.stop_signal: int | None = None  # set by request_stop: run() winds down
        # tasks held by a storage fault, and how their writes are retried (callers may set another policy)
        self.storage = StorageHolds(StorageRetry())
        datasets = {d.name: d for d in cfg.datasets}
        adapters = {a.name: a for a in cfg.adapters}
        for task in cfg.tasks:
            eval_dataset = datasets[task.eval_dataset] if task.eval_dataset else None
            self.add_task(datasets[task.dataset], adapters[task.adapter], task, eval_dataset)

    # -- public API -------------------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], None]) -> None:
        """``callback(event)`` for every step, evaluation, status change and checkpoint (``train/events.py``)."""
        self._subscribers.append(callback)

    def state(self, name: str) -> TaskState:
        return self._tasks[name].state

    @property
    def states(self) -> dict[str, TaskState]:
        return {n: t.state for n, t in self._tasks.items()}

    def add_task(
        self,
        dataset: DatasetConfig,
        adapter: AdapterConfig,
        task: TaskConfig,
        eval_dataset: DatasetConfig | None = None,
    ) -> None:
        """Add a task (also while others train). Resumes from its checkpoints when the output folder has them.

        ``eval_dataset`` (the dataset ``task.eval_dataset`` names) is the held-out set it is evaluated on.
        A task that cannot start (its data, or its resume, raises) leaves nothing behind: its adapter is
        taken off the model, it is not registered and takes no slot, and the error propagates.
        """
        require_new_task_name(task.name, self._tasks)
        root = self.output_dir / "checkpoints" / task.name
        t = Task(
            self.cfg, self.model, self.tokenizer, dataset, adapter, task, self._arrivals,
            checkpoint_dir=root, eval_dataset=eval_dataset,
        )  # fmt: skip
        try:
            resumed = t.resume()
        except BaseException:
            t.release(self.model)
            raise
        self._arrivals += 1
        self._tasks[task.name] = t
        self.metrics.truncate(task.name, t.state.step)  # the steps it redoes are logged again
        if resumed and t.done:
            self._end_step(t, saved=True)  # it only needs its adapter written (a storage fault holds it)
        elif t.state.status == "queued":
            t.begin_step()
        self._emit(StatusEvent(task.name, t.state.status))

    def cancel_task(self, name: str) -> None:
        t = self._tasks[name]
        if t.live:
            self._finish(t, "cancelled", None, export=False)

    def forget(self, name: str) -> TaskState:
        """Drop a finished task (its examples and state) so a long-lived engine does not grow; returns its state."""
        t = self._tasks[name]
        if t.live:
            raise ValueError(
                f"task {name!r} is {t.state.status}; cancel it or let it finish before forgetting it"
            )
        del self._tasks[name]
        self._waited.pop(name, None)
        self.storage.release(name)
        return t.state

    def request_stop(self, signum: int) -> None:
        """Ask ``run`` to stop (e.g. from a SIGTERM handler): see ``run``."""
        self.stop_signal = signum

    def checkpoint_all(self) -> None:
        """Checkpoint every live task at its last completed optimizer step (unless it already is)."""
        for t in self._tasks.values():
            if t.live and t.state.step > 0 and t.state.step not in t.saved_steps():
                try:
                    self._emit(t.save())
                except OSError as e:  # the storage is down: it resumes from its last checkpoint
                    _log.error(
                        "task %s: could not write its checkpoint at step %d: %s", t.name, t.state.step, e
                    )

    def run_once(self) -> bool:
        """One fused micro-batch and the optimizer steps it completes; False when no task has work.

        After ``request_stop`` only tasks in the middle of an optimizer step take part, so that a few calls
        complete those steps and then there is no work left. Tasks held by a storage fault take no part;
        their writes are tried again here once due.
        """
        for name in self.storage.due():
            self._end_step(self._tasks[name], saved=self.storage.saved(name))
        live = [t for t in self._tasks.values() if t.live and t.name not in self.storage]
        if self.stop_signal is not None:
            live = [t for t in live if t.mid_step]
        plan, self._waited = plan_micro_batch(live, self.cfg, self._waited)
        if not plan:
            return False
        tic = time.perf_counter()
        for item in plan:
            t = self._tasks[item.task]
            if t.start():
                self._emit(StatusEvent(t.name, "running"))
        batch = pack_plan(plan, self._tasks, self.device)
        self.metrics.start_background()  # TensorBoard and matplotlib import while the GEMMs run
        prefetch_plotting()  # close() plots the loss curves
        hidden = self.model.forward_packed(batch.input_ids.to(self.device), batch, apply_head=False)
        total = None
        for item in plan:
            t = self._tasks[item.task]
            share = t.kind.loss(self.model.lm_head, hidden, batch, t.name, t.step_norm)
            failure = t.add_share(share)
            if failure is not None:
                self._finish(t, "failed", failure, export=False)
                continue
            total = share.loss if total is None else total + share.loss
        if total is not None and total.requires_grad:
            total.backward()
        elapsed = time.perf_counter() - tic
        stepped = []
        for item in plan:
            t = self._tasks[item.task]
            if t.state.status != "running":
                continue
            t.state.busy_s += elapsed
            t.consume(len(item.examples))
            if not t.pending and self._optimizer_step(t):
                stepped.append(t)
        self._evaluate([t for t in stepped if t.eval_due()])
        for t in stepped:
            self._end_step(t)
        return True

    def run(self, progress: bool = False) -> dict[str, TaskState]:
        """Train until every task has finished; writes the summary table and the loss plot.

        After ``request_stop`` (``lorafleet train`` calls it on SIGTERM/SIGINT) the optimizer steps under
        way are completed, every live task is checkpointed (``checkpoint_all``) and it returns; the tasks
        stay ``queued``/``running`` and the same command resumes them exactly.
        """
        view = None
        if progress:  # rich takes 0.15 s to import: only when a progress view is shown
            from ..progress import ProgressView

            view = ProgressView(self)
        try:
            while self.run_once() or (self.stop_signal is None and self.storage.wait()):
                if view is not None:
                    view.refresh()
            if self.stop_signal is not None:
                self.checkpoint_all()
        finally:
            if view is not None:
                view.close()
            self.close()
        return self.states

    def inference_model(self):
        """(model, tokenizer): the engine holds every layer, so inference can share them."""
        return self.model, self.tokenizer

    def close(self) -> None:
        from ..metrics import plot_curves, read_metrics

        records = read_metrics(self.metrics.path)
        if records:
            plot_curves(records, self.output_dir / "loss.png")
        self.metrics.close()

    # -- internals --------------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        deliver(event, self.metrics, self._subscribers)

    def _optimizer_step(self, t: Task) -> bool:
        """Step and log the task; False when it failed (then it is finished already)."""
        out = t.optimizer_step()
        if not isinstance(out, StepEvent):
            self._finish(t, "failed", out, export=False)
            return False
        self._emit(out)
        return True

    def _evaluate(self, tasks: list[Task]) -> None:
        """Evaluate ``tasks`` on their held-out sets together (fused batches); log; apply early stopping."""
        if not tasks:
            return
        results = evaluate(
            self.model, [t.eval_job() for t in tasks], self.cfg.dispatcher.max_tokens_per_micro_batch
        )
        for t in tasks:
            for event in t.record_eval(results[t.name]):
                self._emit(event)

    def _end_step(self, t: Task, saved: bool = False) -> None:
        """After a step (and its evaluation): checkpoint; finish the task or queue its next step. A write
        that fails holds the task (``saved``: its checkpoint was written, the retry goes on after it)."""
        try:
            if not saved and t.save_due():
                event = t.save()
                saved = True
                self._emit(event)
            if t.done:
                self._finish(t, "succeeded", None, export=True)
            else:
                t.begin_step()
        except OSError as e:
            self._storage_fault(t, saved, e)
            return
        self.storage.release(t.name)

    def _storage_fault(self, t: Task, saved: bool, e: OSError) -> None:
        """Hold ``t`` until its write can be tried again, or fail it when the tries are spent."""
        fault = self.storage.failed(t.name, t.state.step, saved, e)
        _log.warning(
            "task %s: could not write at step %d (try %d): %s", t.name, t.state.step, fault.failures, e
        )
        if fault.retry_in_s is None:
            self._finish(t, "failed", fault.message(), export=False)
        else:
            self._emit(
                StorageFaultEvent(t.name, t.state.step, fault.reason, fault.failures, fault.retry_in_s)
            )

    def _finish(self, t: Task, status: str, error: str | None, export: bool) -> None:
        if export:  # first: a write that fails leaves the task as it was, to be tried again
            t.export(self.output_dir / "adapters" / t.spec.name)
        self.storage.release(t.name)
        t.state.status, t.state.error = status, error
        t.release(self.model)
        self._emit(StatusEvent(t.name, status, error))
