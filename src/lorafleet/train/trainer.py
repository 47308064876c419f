"""The ``Trainer`` protocol: what drives training, whether one process (``Engine``) or a pipeline of
stages (``lorafleet.parallel.PipelineTrainer``, its coordinator on stage 0).

    trainer = Engine(cfg)                       # or PipelineTrainer(cfg) under torchrun, on stage 0
    trainer.subscribe(print)                    # typed events (train/events.py), in order
    trainer.add_task(dataset, adapter, task)    # also while others train
    while trainer.run_once(): ...               # one scheduling step; False when nothing is left to do
    trainer.close()

Both implement the same step semantics (``train/task.py``), so the same tasks give the same adapters and
the same events: ``queued`` and ``running`` status events, one ``StepEvent`` per optimizer step, the
evaluations, a ``CheckpointEvent`` once the whole checkpoint of a step is written (every stage's slice in a
pipeline), and a final status (``succeeded`` once the adapter is written, ``failed`` or ``cancelled``).
The service's worker (``service/worker.py``) depends on this protocol only.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any, Protocol, runtime_checkable

from ..config import AdapterConfig, DatasetConfig, TaskConfig
from ..metrics import MetricsWriter
from .events import RECORDED, Event
from .task import TaskState

__all__ = ["Trainer", "deliver", "require_new_task_name"]


@runtime_checkable
class Trainer(Protocol):
    """Trains tasks that arrive and leave at any time (see the module docstring)."""

    def subscribe(self, callback: Callable[[Event], None]) -> None:
        """``callback(event)`` for every event, in the order they happen."""

    def add_task(
        self,
        dataset: DatasetConfig,
        adapter: AdapterConfig,
        task: TaskConfig,
        eval_dataset: DatasetConfig | None = None,
    ) -> None:
        """Add a task, resuming it from its checkpoints; a task that cannot start raises and leaves nothing."""

    def cancel_task(self, name: str) -> None:
        """Stop a queued or running task (its status becomes ``cancelled``); a finished one is left alone."""

    def forget(self, name: str) -> TaskState:
        """Drop a finished task (so a long-lived trainer does not grow); its last state."""

    def run_once(self) -> bool:
        """Advance training by one scheduling step; False when no task has work left."""

    def state(self, name: str) -> TaskState: ...

    @property
    def states(self) -> dict[str, TaskState]: ...

    def inference_model(self) -> tuple[Any, Any] | None:
        """(the whole model, its tokenizer) when this trainer holds all layers (one process), else None."""

    def close(self) -> None:
        """Flush the metrics (and, for a pipeline, stop its other stages)."""


def deliver(event: Event, metrics: MetricsWriter | None, subscribers: list[Callable[[Event], None]]) -> None:
    """One event out of a trainer: its ``metrics.jsonl`` line (steps, evaluations), then every subscriber."""
    if metrics is not None and isinstance(event, RECORDED):
        metrics.write(event.record())
    for cb in subscribers:
        cb(event)


def require_new_task_name(name: str, *taken: Container[str]) -> None:
    """``add_task``'s check, on every trainer: ``name`` is in none of ``taken`` (the tasks it has, or adds)."""
    if any(name in names for names in taken):
        raise ValueError(f"a task named {name!r} already exists; task names must be unique")
