"""Typed events of a training run: what a ``Task`` reports, what the engine and the pipeline emit.

Subscribers (the CLI's metrics writer, the service's worker, benchmarks) receive these dataclasses; each
that belongs in ``metrics.jsonl`` turns into its record with ``record()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RECORDED",
    "CheckpointEvent",
    "EarlyStopEvent",
    "EvalEvent",
    "Event",
    "StatusEvent",
    "StepEvent",
    "StorageFaultEvent",
    "TrainerFailed",
]


class TrainerFailed(RuntimeError):
    """The trainer itself cannot go on (e.g. a pipeline stage died): no fault of its tasks, which resume
    from their checkpoints when a new trainer takes them (``parallel.PipelineError`` is one)."""


@dataclass(frozen=True)
class StepEvent:
    """A task finished optimizer step ``step`` (1-based): its loss, learning rate and tokens.

    ``metrics``: the task kind's own numbers for the step (e.g. DPO's ``reward_margin``); ``grad_norm`` the
    adapter's global gradient norm before clipping (None when the task does not clip).
    """

    task: str
    step: int
    loss: float
    lr: float
    tokens: int
    elapsed_s: float
    grad_norm: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` record: ``task, step, loss, lr, tokens, <metrics>, elapsed_s[, grad_norm]``."""
        out: dict[str, Any] = {"task": self.task, "step": self.step, "loss": self.loss, "lr": self.lr}
        out.update(tokens=self.tokens, **self.metrics, elapsed_s=self.elapsed_s)
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
        return out


@dataclass(frozen=True)
class EvalEvent:
    """A held-out evaluation after step ``step``: the loss over the whole set, its perplexity and metrics."""

    task: str
    step: int
    loss: float
    num_examples: int
    perplexity: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` record (``kind: eval``; keys ``eval_*`` so that plots keep them apart)."""
        out: dict[str, Any] = {"task": self.task, "step": self.step, "kind": "eval", "eval_loss": self.loss}
        if self.perplexity is not None:
            out["eval_perplexity"] = self.perplexity
        out.update({f"eval_{k}": v for k, v in self.metrics.items()})
        out["eval_examples"] = self.num_examples
        return out


@dataclass(frozen=True)
class EarlyStopEvent:
    """The task ran out of patience after step ``step``; the adapter it keeps is that of ``best_step``."""

    task: str
    step: int
    best_step: int
    best_eval_loss: float

    def record(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "step": self.step,
            "kind": "early_stop",
            "best_step": self.best_step,
            "best_eval_loss": self.best_eval_loss,
        }


@dataclass(frozen=True)
class StatusEvent:
    """The task's status changed: queued, running, succeeded, failed (``error`` says why) or cancelled."""

    task: str
    status: str
    error: str | None = None


@dataclass(frozen=True)
class CheckpointEvent:
    """A checkpoint of the task at ``step`` is complete at ``path``."""

    task: str
    step: int
    path: str


@dataclass(frozen=True)
class StorageFaultEvent:
    """The task's checkpoint (or final adapter) at ``step`` could not be written (``reason``: the error's
    text, no path); it is held and the write is tried again in ``retry_in_s`` s (``train/storage.py``)."""

    task: str
    step: int
    reason: str
    failures: int
    retry_in_s: float


Event = StepEvent | EvalEvent | EarlyStopEvent | StatusEvent | CheckpointEvent | StorageFaultEvent
# the events that are lines of metrics.jsonl (``record()``)
RECORDED = (StepEvent, EvalEvent, EarlyStopEvent)
