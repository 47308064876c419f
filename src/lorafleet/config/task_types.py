"""What each task type (sft, dpo, orpo, kto) takes: dataset formats, sequences per example, its own settings.

A new task type adds its name to ``TaskType`` and one entry to each table; ``type_problems`` then checks a
task's type-specific settings (a setting of another type is an error that names the field and the fix).
"""

from __future__ import annotations

from typing import Any, Literal

from .errors import Loc

__all__ = ["SEQUENCES_PER_EXAMPLE", "TASK_FORMATS", "TYPE_FIELDS", "TaskType", "type_problems"]

TaskType = Literal["sft", "dpo", "orpo", "kto"]
TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt_completion", "chat", "alpaca", "text"),
    "dpo": ("preference",),
    "orpo": ("preference",),
    "kto": ("unpaired_preference",),
}
# Sequences one example becomes in a fused micro-batch (train/tasks.py, train/kto.py): DPO packs chosen and
# rejected twice (under the adapter and under its reference), ORPO once, KTO its completion and its KL
# sequence, each twice.
SEQUENCES_PER_EXAMPLE = {"sft": 1, "dpo": 4, "orpo": 2, "kto": 4}
# Type-specific settings and the types that take them.
TYPE_FIELDS: dict[str, tuple[str, ...]] = {
    "beta": ("dpo", "orpo", "kto"),
    "loss_type": ("dpo",),
    "label_smoothing": ("dpo",),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
    "reference": ("dpo", "kto"),
}


def type_problems(task: Any) -> list[tuple[Loc, str]]:
    """Problems of a ``TaskConfig``'s type-specific settings (fields left at their defaults are fine)."""
    problems: list[tuple[Loc, str]] = []
    for name, allowed in TYPE_FIELDS.items():
        if getattr(task, name) != type(task).model_fields[name].default and task.type not in allowed:
            why = "; orpo has no reference model" if name == "reference" and task.type == "orpo" else ""
            problems.append(
                (
                    (name,),
                    f"is a setting of task type {' and '.join(allowed)}, but this task's type is "
                    f"{task.type!r}{why}; remove {name} or set type: {allowed[0]}",
                )
            )
    if task.type == "dpo" and task.loss_type == "ipo" and task.label_smoothing > 0:
        problems.append(
            (
                ("label_smoothing",),
                f"got {task.label_smoothing} with loss_type ipo; label smoothing applies to the sigmoid "
                "loss only: remove it or use loss_type: sigmoid",
            )
        )
    if task.reference is not None and not task.reference.strip():
        problems.append((("reference",), "is empty; use init, base or a PEFT adapter folder"))
    if task.type == "kto" and task.micro_batch_size < 2:
        problems.append(
            (
                ("micro_batch_size",),
                f"got {task.micro_batch_size}; kto estimates its KL term by pairing each prompt with another "
                "completion of the same micro-batch (as TRL's KTOTrainer), so it needs at least 2: set "
                "micro_batch_size (and batch_size) >= 2",
            )
        )
    return problems
