"""A stage's tasks: adding and resuming them, optimizer steps, checkpoints, failures, retiring, exports.

The half of ``Stage`` (``parallel/stage.py``) that is about tasks rather than messages. On the coordinator
(stage 0) the outcome of each of these becomes a typed event (``train/events.py``) once every stage has
done its part: a step when stage 0 steps (the last stage's loss travels back with the gradient), a
checkpoint once every stage has written it, ``succeeded`` once every stage's slice of the adapter has
arrived and the PEFT folder is written. Other stages report what happened to them in their ``Relay``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import AdapterConfig, DatasetConfig, RunConfig, TaskConfig
from ..models import Decoder
from ..train.checkpoint import scan_checkpoints
from ..train.events import CheckpointEvent, Event, StatusEvent, StepEvent
from ..train.task import Task
from .messages import Added, AddTask, Control, Relay, StepResult
from .topology import Topology

__all__ = ["StageTask", "TaskBook"]


@dataclass
class StageTask:
    """A task as one stage sees it: the ``Task`` (its slice of the adapter) plus pipeline bookkeeping."""

    core: Task
    awaiting_norm: bool = False  # stepped once the coordinator announces the total gradient norm
    awaiting_eval: bool = False  # stepped; its step ends when its evaluation's result arrives
    inflight: int = 0  # micro-batches on this stage with a segment of this task
    retired: bool = False  # finished or failed: no later micro-batch contains it
    finished_at: float | None = None


def live(t: StageTask) -> bool:
    return not t.retired and t.core.state.status in ("queued", "running")


class TaskBook:
    """The task half of a stage (mixed into ``Stage``)."""

    cfg: RunConfig
    topo: Topology
    model: Decoder
    tokenizer: Any
    output_dir: Path
    progress: bool
    tasks: dict[str, StageTask]
    control: Control  # coordinator: announcements for the next message towards the last stage
    relay: Relay  # other stages: what goes back with the next message towards the coordinator
    emit: Callable[[Event], None] | None  # coordinator: where its events go
    queue_eval: Callable[[StageTask], None]
    span: Callable[..., None]

    def _init_book(self) -> None:
        self.adding: dict[str, Task] = {}  # coordinator: tasks announced, waiting for their ``Added``
        self.added: dict[str, Added] = {}  # coordinator: answers that arrived
        self.collected: dict[str, dict[int, dict[str, torch.Tensor]]] = {}  # coordinator: slices by stage
        self.confirmed: dict[tuple[str, int], set[int]] = {}  # coordinator: stages that saved (task, step)

    # -- adding tasks ---------------------------------------------------------------------------------------

    def build_task(
        self, dataset: DatasetConfig, adapter: AdapterConfig, task: TaskConfig,
        eval_dataset: DatasetConfig | None, arrival: int,
    ) -> Task:  # fmt: skip
        """This stage's slice of a new task (its data read, its adapter slice on this stage's layers)."""
        root = (
            self.output_dir / "checkpoints" / task.name / f"stage-{self.topo.stage}-of-{self.topo.num_stages}"
        )
        return Task(
            self.cfg, self.model, self.tokenizer, dataset, adapter, task, arrival,
            checkpoint_dir=root, eval_dataset=eval_dataset, layers=tuple(self.topo.layers),
        )  # fmt: skip

    @staticmethod
    def intact_steps(core: Task) -> list[int]:
        """The steps of this stage's checkpoints of ``core`` that pass their manifest."""
        return list(scan_checkpoints(core.checkpoint_dir)[0])

    def _begin_add(self, add: AddTask) -> None:
        """Another stage than the coordinator: build the announced task; the last stage answers."""
        name = add.task.name
        if add.failed is None:
            try:
                core = self.build_task(add.dataset, add.adapter, add.task, add.eval_dataset, add.arrival)
                self.tasks[name] = StageTask(core=core)
                add.common = sorted(set(add.common) & set(self.intact_steps(core)))
            except Exception as e:
                add.failed = f"stage {self.topo.stage} (rank {self.topo.rank}) could not add it: {type(e).__name__}: {e}"
        if self.topo.is_last:
            answer = Added(max(add.common, default=0), add.failed)
            if answer.error is None:
                answer = self.resume_added(self.tasks[name].core, answer)
            self.relay.added[name] = answer
            self.finish_add(name, answer)

    @staticmethod
    def resume_added(core: Task, answer: Added) -> Added:
        """Resume ``core`` from the answer's step; a checkpoint that does not load makes it an error."""
        try:
            if answer.step:
                core.resume(answer.step)
        except Exception as e:
            return Added(answer.step, f"{type(e).__name__}: {e}")
        return answer

    def finish_add(self, name: str, answer: Added) -> None:
        """Every stage, as the answer passes on its way back: resume (or drop) its slice; ready to run."""
        if self.topo.is_first:
            core = self.adding.pop(name)
            self.added[name] = answer
            if answer.error is not None:
                core.release(self.model)
                return
            if self.topo.num_stages > 1:  # alone, the stage resumed it while answering
                answer = self.resume_added(core, answer)
                if answer.error is not None:
                    raise RuntimeError(f"task {name}: {answer.error}")
            t = self.tasks[name] = StageTask(core=core)
        else:
            t = self.tasks.get(name)
            if answer.error is not None:
                if t is not None:
                    self.tasks.pop(name)
                    t.core.release(self.model)
                return
            if not self.topo.is_last and self.resume_added(t.core, answer).error is not None:
                raise RuntimeError(f"task {name}: could not resume the checkpoint at step {answer.step}")
        if answer.step and t.core.done:
            self._queue_export(t)
            self._retire(t, "succeeded", None)
        else:
            t.core.begin_step()

    # -- optimizer steps ------------------------------------------------------------------------------------

    def set_results(self, results: dict[str, StepResult]) -> None:
        """The last stage's loss of each task whose step just ended, so every stage's state carries it."""
        for name, r in results.items():
            t = self.tasks.get(name)
            if t is not None and live(t):
                t.core.step_loss, t.core.step_tokens, t.core.step_metrics = r.loss, r.tokens, dict(r.metrics)

    def _step(self, t: StageTask, grad_norm: float | None) -> None:
        """Step task t's optimizer for this stage's slice (``grad_norm``: the total over every stage)."""
        tic = time.time()
        core = t.core
        out = core.optimizer_step(grad_norm)
        self.span("step", tic, -1, (core.name,))
        if not isinstance(out, StepEvent):
            self._report_failure(t, out)
            return
        if self.emit is not None:
            self.emit(out)
            if self.progress:
                print(f"{out.task} step {out.step}/{core.state.total_steps} loss {out.loss:.4f}", flush=True)
        if core.eval_due():
            t.awaiting_eval = True
            if self.topo.is_first:
                self.queue_eval(t)
            return
        self._end_step(t)

    def _end_step(self, t: StageTask) -> None:
        """After a step (and its evaluation): checkpoint; finish the task or queue its next step."""
        core = t.core
        if core.save_due():
            ev = core.save()
            self._saved(core.name, self.topo.stage, ev.step)
        if core.done:
            self._queue_export(t)
            self._retire(t, "succeeded", None)
        else:
            core.begin_step()

    def _saved(self, name: str, stage: int, step: int) -> None:
        """Stage ``stage`` wrote task ``name``'s checkpoint of ``step``; the coordinator's event once all did."""
        if not self.topo.is_first:
            self.relay.saved.append((name, stage, step))
            return
        t = self.tasks.get(name)
        if t is None or t.core.state.status not in ("queued", "running"):
            return
        got = self.confirmed.setdefault((name, step), set())
        got.add(stage)
        if len(got) == self.topo.num_stages:
            del self.confirmed[(name, step)]
            path = t.core.checkpoint_dir / f"step-{step:06d}"
            self.emit(CheckpointEvent(name, step, str(path)))

    # -- failures, retiring ---------------------------------------------------------------------------------

    def _report_failure(self, t: StageTask, reason: str) -> None:
        """A failure seen here: the coordinator decides, the others tell it with their next message back."""
        if self.topo.is_first:
            self._note_failure(t.core.name, reason)
        else:
            self.relay.failed[t.core.name] = reason
            t.core.state.status, t.core.state.error = "failed", reason

    def _note_failure(self, name: str, reason: str) -> None:
        """Coordinator: task ``name`` failed (here or on a later stage)."""
        t = self.tasks.get(name)
        if t is None or t.core.state.status not in ("queued", "running"):
            return
        if not t.retired:
            self._retire(t, "failed", reason)
        else:  # it had finished here but its adapter was not written yet
            t.core.state.status, t.core.state.error = "failed", reason
            self.collected.pop(name, None)
            self.emit(StatusEvent(name, "failed", reason))

    def _retire(self, t: StageTask, status: str, error: str | None) -> None:
        """No later micro-batch contains t; its adapter leaves this stage once none in flight does.

        On the coordinator a succeeded task stays ``running`` until its adapter is written."""
        if t.retired:
            return
        t.retired = True
        t.finished_at = time.time()
        t.core.pending = []
        name = t.core.name
        if not self.topo.is_first:
            t.core.state.status, t.core.state.error = status, error
            return
        if self.topo.num_stages > 1:
            self.control.retired[name] = (status, error)
        if t.core.started_at is not None:  # its wall time in the pipeline: tokens/s in the summary
            t.core.state.busy_s = time.perf_counter() - t.core.started_at
        if status != "succeeded":  # a finished one still collects its last checkpoint and slices
            for key in [k for k in self.confirmed if k[0] == name]:
                del self.confirmed[key]
            t.core.state.status, t.core.state.error = status, error
            self.collected.pop(name, None)
            self.emit(StatusEvent(name, status, error))

    def cancel(self, name: str) -> None:
        """Coordinator: stop task ``name`` (announced to the others with the next message)."""
        t = self.tasks[name]
        if live(t):
            t.awaiting_norm = False
            self._retire(t, "cancelled", None)
            self.remove_retired()

    def remove_retired(self) -> None:
        """Take the adapters of retired tasks off this stage once no micro-batch or evaluation needs them."""
        for t in self.tasks.values():
            if t.retired and t.inflight == 0 and not t.awaiting_eval and t.core.params:
                t.core.release(self.model)

    # -- exports --------------------------------------------------------------------------------------------

    def _queue_export(self, t: StageTask) -> None:
        state = t.core.final_state()
        if self.topo.is_first:
            self._note_exports(t.core.name, {0: state})
        else:
            self.relay.exports.setdefault(t.core.name, {})[self.topo.stage] = state

    def _note_exports(self, name: str, slices: dict[int, dict[str, torch.Tensor]]) -> None:
        """Coordinator: slices of a finished adapter; the PEFT folder once every stage's is here."""
        t = self.tasks.get(name)
        if t is None or t.core.state.status not in ("queued", "running"):
            return
        got = self.collected.setdefault(name, {})
        got.update(slices)
        if len(got) == self.topo.num_stages:
            merged = {k: v for s in sorted(got) for k, v in got[s].items()}
            t.core.export(self.output_dir / "adapters" / t.core.spec.name, merged)
            del self.collected[name]
            t.core.state.status = "succeeded"
            self.emit(StatusEvent(name, "succeeded"))

    # -- what travels back, and the coordinator's announcements ---------------------------------------------

    def absorb(self, relay: Relay) -> None:
        """A relay from the next stage: the coordinator acts on it; the others act on answers and pass it on."""
        for name, answer in relay.added.items():
            self.finish_add(name, answer)
        if not self.topo.is_first:
            self.relay.merge(relay)
            return
        for name, stage, step in relay.saved:
            self._saved(name, stage, step)
        for name, reason in relay.failed.items():
            self._note_failure(name, reason)
        for name, slices in relay.exports.items():
            self._note_exports(name, slices)

    def take_relay(self) -> Relay:
        out, self.relay = self.relay, Relay()
        return out

    def take_control(self) -> Control:
        out, self.control = self.control, Control()
        return out

    def apply(self, control: Control) -> None:
        """Another stage than the coordinator: the coordinator's announcements, in order."""
        for name, total_sq in control.norms.items():
            t = self.tasks.get(name)
            if t is not None and t.awaiting_norm:
                t.awaiting_norm = False
                self._step(t, total_sq**0.5)
        for name, (status, error) in control.retired.items():
            t = self.tasks.get(name)
            if t is not None and not t.retired:
                t.awaiting_norm = False
                self._retire(t, status, error)
        self.remove_retired()
        for name in control.forget:
            t = self.tasks.pop(name, None)
            if t is not None and t.core.params:
                t.core.release(self.model)
        for add in control.add:
            self._begin_add(add)
