"""The typed messages between pipeline stages (see ``parallel/pipeline.py`` for the protocol).

Every message is a dataclass; on the wire it is pickled with ``VERSION`` in its header, and a stage that
receives another version stops with a clear error instead of misreading it (all stages of a run must run
the same lorafleet). Towards the last stage (the forward link) travel ``Forward`` (a micro-batch),
``Sync`` and ``Stop``, each with the coordinator's ``Control``; back towards the coordinator (the backward
link) travel ``Backward`` (a gradient), ``EvalDone``, ``SyncAck`` and ``StopAck``, each with a ``Relay`` of
what the later stages have to tell it. ``Abort`` goes either way; ``Lost`` is made locally when a link
breaks. The forward link is ordered, so a control (a task added, a task retired, a total gradient norm)
reaches every stage before any later micro-batch does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..batch import FusedBatch, Segment, SequenceInfo
from ..config import AdapterConfig, DatasetConfig, TaskConfig
from ..train.evaluate import EvalResult
from ..train.tasks import StepNorm

__all__ = [
    "BACKWARD_KINDS",
    "FORWARD_KINDS",
    "VERSION",
    "Abort",
    "AddTask",
    "Added",
    "Backward",
    "BatchMeta",
    "Control",
    "EvalDone",
    "Forward",
    "Lost",
    "Relay",
    "StepResult",
    "Stop",
    "StopAck",
    "Sync",
    "SyncAck",
]

VERSION = 1  # bump when any message below changes shape


@dataclass
class BatchMeta:
    """What another stage needs to rebuild a ``FusedBatch`` (small CPU tensors and tuples)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    labels: torch.Tensor | None
    segments: tuple[tuple[str, int, int], ...]
    sequences: tuple[tuple[Any, ...], ...]

    @staticmethod
    def of(batch: FusedBatch) -> BatchMeta:
        return BatchMeta(
            input_ids=batch.input_ids.cpu(),
            positions=batch.positions.cpu(),
            cu_seqlens=batch.cu_seqlens.cpu(),
            labels=None if batch.labels is None else batch.labels.cpu(),
            segments=tuple((s.adapter, s.start, s.end) for s in batch.segments),
            sequences=tuple((s.task, s.example, s.role, s.key) for s in batch.sequences),
        )

    def batch(self, device: str) -> FusedBatch:
        return FusedBatch(
            input_ids=self.input_ids.to(device),
            positions=self.positions.to(device),
            cu_seqlens=self.cu_seqlens.to(device),
            segments=tuple(Segment(*s) for s in self.segments),
            labels=None if self.labels is None else self.labels.to(device),
            sequences=tuple(SequenceInfo(*s) for s in self.sequences),
        )


@dataclass
class AddTask:
    """A task the coordinator added: every stage builds its slice of the adapter and optimizer.

    ``common``: the checkpointed steps that every stage it passed holds (each intersects its own); the last
    stage resumes from the newest and announces it back (``Added``). ``failed``: a stage could not build it
    (its reason); the later ones skip it.
    """

    dataset: DatasetConfig
    adapter: AdapterConfig
    task: TaskConfig
    eval_dataset: DatasetConfig | None
    arrival: int
    common: list[int]
    failed: str | None = None


@dataclass
class Added:
    """The last stage's answer to an ``AddTask``: the step every stage resumes from (0: from scratch)."""

    step: int
    error: str | None = None


@dataclass
class Control:
    """The coordinator's announcements, applied in this order by every stage when they arrive.

    ``norms``: total squared gradient norm of clipped tasks ending a step (the other stages step them now);
    ``retired``: tasks that stopped (status, error); ``forget``: finished tasks to drop; ``add``: new tasks.
    """

    norms: dict[str, float] = field(default_factory=dict)
    retired: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    forget: list[str] = field(default_factory=list)
    add: list[AddTask] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.norms or self.retired or self.forget or self.add)


@dataclass
class StepResult:
    """A task's step as the last stage computed it: its loss, tokens and task metrics."""

    loss: float
    tokens: int
    metrics: dict[str, float]


@dataclass
class Relay:
    """What stages after the coordinator tell it, gathered along the backward link.

    ``failed``: tasks that failed there (reason); ``exports``: slices of finished adapters by stage;
    ``saved``: (task, stage, step) of every checkpoint written; ``added``: answers to ``AddTask``.
    """

    failed: dict[str, str] = field(default_factory=dict)
    exports: dict[str, dict[int, dict[str, torch.Tensor]]] = field(default_factory=dict)
    saved: list[tuple[str, int, int]] = field(default_factory=list)
    added: dict[str, Added] = field(default_factory=dict)

    def merge(self, other: Relay) -> None:
        self.failed.update(other.failed)
        for name, slices in other.exports.items():
            self.exports.setdefault(name, {}).update(slices)
        self.saved += other.saved
        self.added.update(other.added)

    def __bool__(self) -> bool:
        return bool(self.failed or self.exports or self.saved or self.added)


@dataclass
class Forward:
    """A micro-batch's activations (the tensor) and what later stages need to run it.

    ``step_norms``: each task's step denominators; ``ends``: tasks whose step it completes. An evaluation
    batch has ``eval`` (its jobs) and ``eval_ends`` (jobs whose last batch it is) and ``mb`` -1.
    """

    mb: int
    batch: BatchMeta
    step_norms: dict[str, StepNorm | None]
    ends: tuple[str, ...]
    control: Control
    eval: tuple[str, ...] | None = None
    eval_ends: tuple[str, ...] = ()


@dataclass
class Backward:
    """The gradient of micro-batch ``mb`` (the tensor), back towards the coordinator.

    ``grad_sq``: per clipped task ending its step, the squared gradient norm of the later stages;
    ``results``: the last stage's loss of every task whose step this micro-batch ends.
    """

    mb: int
    grad_sq: dict[str, float]
    results: dict[str, StepResult]
    relay: Relay


@dataclass
class EvalDone:
    """The result of a task's evaluation, from the last stage back to the coordinator."""

    task: str
    result: EvalResult
    relay: Relay


@dataclass
class Sync:
    """The coordinator's control with nothing to run: tasks added, or announcements while idle."""

    control: Control


@dataclass
class SyncAck:
    """Every stage applied the ``Sync``; what they had to tell."""

    relay: Relay


@dataclass
class Stop:
    """The end of the run (the last control before it); ``spans``: send the trace back with the ack."""

    control: Control
    spans: bool = False


@dataclass
class StopAck:
    """The later stages stopped: what they had to tell, and (when asked) their trace spans."""

    relay: Relay
    spans: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Abort:
    """A stage failed; ``error`` names it."""

    error: str


@dataclass
class Lost:
    """Made locally: the link to a neighbour broke (the process died, or it speaks another version)."""

    error: str


FORWARD_KINDS = (Forward, Sync, Stop)
BACKWARD_KINDS = (Backward, EvalDone, SyncAck)
