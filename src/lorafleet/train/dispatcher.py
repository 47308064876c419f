"""The scheduling policy: which tasks' examples form the next fused micro-batch. Pure Python, no torch.

    views = [TaskView("a", priority=0, arrival=0, micro_batch_size=4, pending=((0, 120), (1, 80)), started=True)]
    plan = plan_next(views, max_tokens=4096, max_concurrent=8)   # [PlanItem("a", (0, 1), ends_step=True)]

The engine describes each task's state as a ``TaskView`` (what is left of its current optimizer step) and
runs what ``plan_next`` returns; it never decides anything itself. The rules:

Slots (``active_tasks``). At most ``max_concurrent`` tasks train at a time. A task that has started (run
at least one micro-batch) keeps its slot until it finishes, even when a higher-priority task arrives, so
no half-done optimizer step is ever abandoned. Free slots go to waiting tasks by ``(-priority, arrival)``.

Packing (``plan_next``). Active tasks are visited in the order ``(-priority, -waited, arrival)`` and each
takes the longest prefix of its pending examples, at most ``micro_batch_size`` of them, whose tokens still
fit ``max_tokens``; a task whose next example does not fit stops there (its examples run in order) and
later tasks may still fill the rest of the budget with smaller examples. A chunk smaller than
``micro_batch_size`` is fine: the engine divides the loss by the supervised tokens of the whole step, so
any split of a step gives the same gradient. A single example larger than ``max_tokens`` runs alone when
its task comes first in the order, so it never blocks forever.

Groups. A task whose examples depend on each other (KTO's KL estimate pairs the examples of a group of
``group`` consecutive ones) takes whole groups only: its prefix is cut back to a multiple of ``group``
(unless it takes all that is pending), and a group larger than the budget runs alone like a large example.

Fairness. Priority is strict: a lower-priority task only gets tokens that higher-priority tasks could not
use. Within one priority, ``waited`` (how many plans in a row the task was active, had pending examples
and got nothing; the engine keeps it with ``next_waited``) moves a task that was left out to the front, so
among the ``m`` active tasks of the highest waiting priority none is left out more than ``m - 1`` plans in
a row. An engine that does not track ``waited`` (always 0) gets plain arrival order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["PlanItem", "TaskView", "active_tasks", "admission", "next_waited", "plan_next"]


@dataclass(frozen=True)
class TaskView:
    """What the dispatcher knows about one task (the engine builds these before each plan)."""

    name: str
    priority: int
    arrival: int  # arrival order, smaller = earlier
    micro_batch_size: int
    pending: tuple[
        tuple[int, int], ...
    ]  # (example id, num tokens) still to run in the current step, in order
    started: bool  # has run at least one micro-batch (keeps its slot until it finishes)
    waited: int = 0  # plans in a row it was active with pending examples but got none (see next_waited)
    group: int = 1  # examples are taken in whole groups of this many (KTO's KL groups; pending is aligned)


@dataclass(frozen=True)
class PlanItem:
    """One task's share of a fused micro-batch."""

    task: str
    examples: tuple[int, ...]  # a prefix of that task's pending ids, at most micro_batch_size of them
    ends_step: bool  # True when it takes the last pending example of the step


def active_tasks(tasks: Iterable[TaskView], max_concurrent: int) -> list[TaskView]:
    """The tasks holding a slot, in packing order ``(-priority, -waited, arrival)``.

    Every started task keeps its slot (even beyond ``max_concurrent``); the remaining slots go to
    not-started tasks by ``(-priority, arrival)``.
    """
    views = _check(tasks)
    if max_concurrent < 1:
        raise ValueError(f"max_concurrent = {max_concurrent}; at least one task must be able to run")
    started = [t for t in views if t.started]
    waiting = sorted((t for t in views if not t.started), key=lambda t: (-t.priority, t.arrival))
    chosen = started + waiting[: max(0, max_concurrent - len(started))]
    return sorted(chosen, key=_order)


def plan_next(tasks: Iterable[TaskView], *, max_tokens: int, max_concurrent: int) -> list[PlanItem]:
    """The next fused micro-batch: one item per contributing task, in packing order (see the module docstring).

    Empty exactly when no active task has pending examples.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens = {max_tokens}; the token budget must be at least 1")
    plan: list[PlanItem] = []
    used = 0
    for t in active_tasks(tasks, max_concurrent):
        if not t.pending:
            continue
        take = 0
        for _, n in t.pending[: t.micro_batch_size]:
            if used + n > max_tokens:
                break
            used += n
            take += 1
        if t.group > 1 and take < len(t.pending[: t.micro_batch_size]):
            used -= sum(n for _, n in t.pending[take - take % t.group : take])
            take -= take % t.group
        first = min(t.group, len(t.pending))
        if take == 0 and not plan and sum(n for _, n in t.pending[:first]) > max_tokens:
            # Larger than the whole budget: it can only ever run alone, and it is first in line now.
            return [_item(t, first)]
        if take:
            plan.append(_item(t, take))
    return plan


def next_waited(
    tasks: Iterable[TaskView], plan: Sequence[PlanItem], *, max_concurrent: int
) -> dict[str, int]:
    """Each task's ``waited`` for the next plan: +1 if it was active with pending examples and left out, else 0."""
    views = list(tasks)
    active = {t.name for t in active_tasks(views, max_concurrent)}
    planned = {item.task for item in plan}
    return {
        t.name: t.waited + 1 if (t.name in active and t.pending and t.name not in planned) else 0
        for t in views
    }


def admission(tasks: Iterable[TaskView], max_concurrent: int) -> dict[str, str]:
    """Why each task without a slot waits, as a sentence for progress displays; active tasks are absent."""
    views = _check(tasks)
    active = active_tasks(views, max_concurrent)
    names = {t.name for t in active}
    queue = sorted((t for t in views if t.name not in names), key=lambda t: (-t.priority, t.arrival))
    holders = ", ".join(t.name for t in active)
    return {
        t.name: (
            f"queued ({i + 1} of {len(queue)}): all {max_concurrent} slots of dispatcher.max_concurrent_tasks are "
            f"taken ({holders}); it starts when one of them finishes (raise max_concurrent_tasks to run more at once)"
        )
        for i, t in enumerate(queue)
    }


def _order(t: TaskView) -> tuple[int, int, int]:
    return (-t.priority, -t.waited, t.arrival)


def _item(t: TaskView, take: int) -> PlanItem:
    return PlanItem(t.name, tuple(i for i, _ in t.pending[:take]), ends_step=take == len(t.pending))


def _check(tasks: Iterable[TaskView]) -> list[TaskView]:
    views = list(tasks)
    seen: set[str] = set()
    for t in views:
        if t.name in seen:
            raise ValueError(f"two tasks are named {t.name!r}; task names must be unique")
        seen.add(t.name)
        if t.micro_batch_size < 1:
            raise ValueError(
                f"task {t.name!r}: micro_batch_size = {t.micro_batch_size}; it must be at least 1"
            )
        if any(n < 1 for _, n in t.pending):
            raise ValueError(f"task {t.name!r}: an example has fewer than 1 token; every example has tokens")
    return views
