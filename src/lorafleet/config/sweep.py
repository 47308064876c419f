"""Sweep expansion: one task with lists of values becomes one adapter and task per combination.

A task may carry ``sweep:`` with lists of values, e.g. ``{lr: [1.0e-4, 1.0e-3], rank: [4, 8]}``. When the
config is validated it expands into the product of the lists: one copy of the task per combination, each
with its own copy of the task's adapter, named ``<task>-<values>`` (e.g. ``science-lr0p001-r8``). Every copy
records where it came from (``sweep_point``); ``lorafleet.train.sweep`` ranks them after training.

A sweep must fit the dispatcher: if the expanded run has more tasks than
``dispatcher.max_concurrent_tasks``, the extra ones would wait for free slots rather than train together,
which is rarely what a sweep means; validation refuses it with the numbers and the ways out, one of which
is ``sweep.queue: true`` (run them in waves).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from .errors import Loc
from .fields import Float, Int, Section, distinct

__all__ = [
    "SWEEP_KEYS",
    "SweepConfig",
    "SweepPoint",
    "expand_sweeps",
    "sweep_combinations",
    "sweep_name",
    "sweep_problems",
]


class SweepConfig(Section):
    """Lists of values to try; the task becomes one task and adapter per combination (``config/sweep.py``)."""

    lr: Annotated[list[Annotated[Float, Field(gt=0)]], AfterValidator(distinct)] | None = Field(
        None, min_length=1, description="Learning rates (optimizer.lr)."
    )
    weight_decay: Annotated[list[Annotated[Float, Field(ge=0)]], AfterValidator(distinct)] | None = Field(
        None, min_length=1, description="Weight decays (optimizer.weight_decay)."
    )
    warmup_steps: Annotated[list[Annotated[Int, Field(ge=0)]], AfterValidator(distinct)] | None = Field(
        None, min_length=1, description="Warmup steps (lr_scheduler.warmup_steps)."
    )
    rank: Annotated[list[Annotated[Int, Field(gt=0)]], AfterValidator(distinct)] | None = Field(
        None, min_length=1, description="Adapter ranks (the task's adapter's rank)."
    )
    alpha: Annotated[list[Annotated[Float, Field(gt=0)]], AfterValidator(distinct)] | None = Field(
        None, min_length=1, description="Adapter alphas (the task's adapter's alpha)."
    )
    dropout: Annotated[list[Annotated[Float, Field(ge=0, lt=1)]], AfterValidator(distinct)] | None = Field(
        None, min_length=1, description="Adapter dropouts (the task's adapter's dropout)."
    )
    beta: Annotated[list[Annotated[Float, Field(gt=0)]], AfterValidator(distinct)] | None = Field(
        None, min_length=1, description="DPO/ORPO betas (the task's beta)."
    )
    queue: bool = Field(
        False,
        description="Allow more tasks than dispatcher.max_concurrent_tasks; the extra combinations wait "
        "for a free slot and train in later waves (false: such a sweep is refused).",
    )


class SweepPoint(Section):
    """Filled in by sweep expansion (not by hand): the task this one was expanded from, and its values."""

    task: str = Field(description="Name of the sweeping task in the config as written.")
    values: dict[str, int | float] = Field(
        description="The swept values of this combination, e.g. {lr: 0.001, rank: 8}."
    )


# sweep key -> (where the value goes, field name, short label in names)
SWEEP_KEYS: dict[str, tuple[str, str, str]] = {
    "lr": ("optimizer", "lr", "lr"),
    "weight_decay": ("optimizer", "weight_decay", "wd"),
    "warmup_steps": ("lr_scheduler", "warmup_steps", "wu"),
    "rank": ("adapter", "rank", "r"),
    "alpha": ("adapter", "alpha", "a"),
    "dropout": ("adapter", "dropout", "d"),
    "beta": ("task", "beta", "b"),
}


def sweep_combinations(sweep: Any) -> list[dict[str, float | int]]:
    """Every combination of a ``SweepConfig``'s lists, keys in ``SWEEP_KEYS`` order, last key fastest."""
    keys = [k for k in SWEEP_KEYS if getattr(sweep, k, None)]
    return [dict(zip(keys, values)) for values in itertools.product(*(getattr(sweep, k) for k in keys))]


def _fmt(value: float | int) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text.replace(".", "p").replace("+", "")


def sweep_name(task: str, values: dict[str, float | int]) -> str:
    """``<task>-<label><value>...``, e.g. ``science-lr0p001-r8``: a valid task, adapter and folder name."""
    return "-".join([task, *(f"{SWEEP_KEYS[k][2]}{_fmt(v)}" for k, v in values.items())])


def sweep_problems(cfg: Any) -> list[tuple[Loc, str]]:
    """Mistakes in the config's sweeps, as ``(field path, message)``; empty when ``expand_sweeps`` may run."""
    problems: list[tuple[Loc, str]] = []
    sweeping = [(i, t) for i, t in enumerate(cfg.tasks) if t.sweep is not None]
    if not sweeping:
        return problems
    counts = {i: len(sweep_combinations(t.sweep)) for i, t in sweeping}
    total = len(cfg.tasks) - len(sweeping) + sum(counts.values())
    limit = cfg.dispatcher.max_concurrent_tasks
    taken = {t.name for t in cfg.tasks if t.sweep is None} | {a.name for a in cfg.adapters}
    for i, t in sweeping:
        loc: Loc = ("tasks", i, "sweep")
        combos = sweep_combinations(t.sweep)
        if not combos:
            problems.append((loc, "lists no values; give at least one list, e.g. lr: [1.0e-4, 1.0e-3]"))
            continue
        if t.eval_dataset is None:
            problems.append(
                (
                    loc,
                    f"the {len(combos)} combinations are ranked by eval loss, but tasks[{i}] has no "
                    "eval_dataset; add eval_dataset: NAME (a held-out dataset) to the task",
                )
            )
        if "beta" in combos[0] and t.type == "sft":
            problems.append(
                (
                    (*loc, "beta"),
                    "beta is a dpo/orpo setting and this task's type is sft; remove it from the sweep",
                )
            )
        for values in combos:
            name = sweep_name(t.name, values)
            if name in taken:
                problems.append(
                    (
                        loc,
                        f"combination {values} would be named {name!r}, which is already a task or adapter name; "
                        f"rename task {t.name!r} or that entry",
                    )
                )
                break
            taken.add(name)
        if total > limit and not t.sweep.queue:
            sizes = " x ".join(f"{k}: {len(getattr(t.sweep, k))}" for k in combos[0])
            others = total - counts[i]
            head = f"expands to {counts[i]} combinations ({sizes})"
            if others:
                head += f"; with the run's other {others} task(s) that makes {total} tasks"
            else:
                head += f", so {total} tasks"
            problems.append(
                (
                    loc,
                    f"{head}, but dispatcher.max_concurrent_tasks is {limit}, so {total - limit} of them would "
                    f"wait for a free slot instead of training together. Raise dispatcher.max_concurrent_tasks "
                    f"to {total} (each running task holds its adapter, optimizer state and activations), shrink "
                    f"the sweep, or set tasks[{i}].sweep.queue: true to train them {limit} at a time",
                )
            )
    return problems


def expand_sweeps(cfg: Any) -> None:
    """Replace every sweeping task (and its adapter) by one task and adapter per combination, in place.

    Call only when ``sweep_problems(cfg)`` is empty. Each expanded task has ``sweep`` None and
    ``sweep_point`` set, so expanding an expanded config changes nothing.
    """

    adapters = {a.name: a for a in cfg.adapters}
    swept_adapters = {t.adapter for t in cfg.tasks if t.sweep is not None}
    new_tasks, new_adapters = [], []
    for t in cfg.tasks:
        if t.sweep is None:
            new_tasks.append(t)
            continue
        base_adapter = adapters[t.adapter]
        for values in sweep_combinations(t.sweep):
            name = sweep_name(t.name, values)
            by_section: dict[str, dict[str, Any]] = defaultdict(dict)
            for key, value in values.items():
                section, field, _ = SWEEP_KEYS[key]
                by_section[section][field] = value
            adapter = base_adapter.model_copy(update={"name": name, **by_section["adapter"]})
            update: dict[str, Any] = {
                "name": name,
                "adapter": name,
                "sweep": None,
                "sweep_point": SweepPoint(task=t.name, values=dict(values)),
                **by_section["task"],
            }
            for section in ("optimizer", "lr_scheduler"):
                if by_section[section]:
                    update[section] = getattr(t, section).model_copy(update=by_section[section])
            new_tasks.append(t.model_copy(update=update))
            new_adapters.append(adapter)
    cfg.adapters = [a for a in cfg.adapters if a.name not in swept_adapters] + new_adapters
    cfg.tasks = new_tasks
