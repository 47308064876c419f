"""How the sections of a run refer to each other: the checks that need the whole ``RunConfig``.

Names are unique within datasets, adapters and tasks; a task names an existing adapter (one task per
adapter) and existing datasets of a format its type trains on; a dpo/kto task's ``reference`` fits its
adapter (``train/reference.py``); one example of every task fits the dispatcher's token budget.
"""

from __future__ import annotations

from typing import Any

from .errors import Loc, unknown_name
from .task_types import SEQUENCES_PER_EXAMPLE, TASK_FORMATS

__all__ = ["link_problems"]


def link_problems(run: Any) -> list[tuple[Loc, str]]:
    """Problems (field path, message) of a ``RunConfig``'s cross-section references; [] when it is sound."""
    problems: list[tuple[Loc, str]] = []
    for section in ("datasets", "adapters", "tasks"):
        items = getattr(run, section)
        if not items:
            problems.append(((section,), f"got []; list at least one entry under {section}"))
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            if item.name in seen:
                problems.append(
                    (
                        (section, i, "name"),
                        f"{item.name!r} is already the name of {section}[{seen[item.name]}]; "
                        "give every entry a different name",
                    )
                )
            seen.setdefault(item.name, i)
    datasets = {d.name: d for d in run.datasets}
    adapters = {a.name for a in run.adapters}
    used_by: dict[str, int] = {}
    budget = run.dispatcher.max_tokens_per_micro_batch
    for i, t in enumerate(run.tasks):
        if t.adapter not in adapters:
            problems.append((("tasks", i, "adapter"), unknown_name(t.adapter, "adapter", adapters)))
        elif t.adapter in used_by:
            j = used_by[t.adapter]
            problems.append(
                (
                    ("tasks", i, "adapter"),
                    f"{t.adapter!r} is already trained by tasks[{j}] ({run.tasks[j].name!r}); an adapter "
                    "belongs to one task: add another adapter entry for this task",
                )
            )
        else:
            used_by[t.adapter] = i
        for field in ("dataset", "eval_dataset"):
            ref = getattr(t, field)
            if ref is None:
                continue
            if ref not in datasets:
                problems.append((("tasks", i, field), unknown_name(ref, "dataset", set(datasets))))
            elif datasets[ref].format not in TASK_FORMATS[t.type]:
                problems.append(
                    (
                        ("tasks", i, field),
                        f"dataset {ref!r} has format {datasets[ref].format!r}, which a task of type {t.type!r} "
                        f"cannot train on; use a dataset with format "
                        f"{' or '.join(repr(f) for f in TASK_FORMATS[t.type])}",
                    )
                )
        if t.adapter in adapters:
            from ..train.reference import reference_problem

            problem = reference_problem(t, next(a for a in run.adapters if a.name == t.adapter))
            if problem:
                problems.append((("tasks", i, "reference"), problem))
        per_example = SEQUENCES_PER_EXAMPLE[t.type]
        if t.max_seq_len * per_example > budget:
            times = f" x {per_example} sequences per {t.type} example" if per_example > 1 else ""
            problems.append(
                (
                    ("tasks", i, "max_seq_len"),
                    f"got {t.max_seq_len}{times}, more than dispatcher.max_tokens_per_micro_batch = "
                    f"{budget}, so one example could not fit a micro-batch; lower max_seq_len to <= "
                    f"{budget // per_example} or raise dispatcher.max_tokens_per_micro_batch",
                )
            )
    return problems
