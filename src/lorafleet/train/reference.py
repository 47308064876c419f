"""The frozen reference of a preference task (dpo, kto): which one, and putting it on the model.

DPO and KTO compare the policy (the task's adapter) with a frozen reference model. The reference is:

- ``init`` (the default when the task's adapter starts from ``init_from``): a frozen copy of the adapter's
  starting weights, as TRL keeps for a PEFT model that already holds an adapter (its ``ref`` adapter). DPO
  after SFT then optimises the DPO objective against the SFT policy, and the first step's loss is log 2.
- ``base`` (the default when the adapter starts at zero, where it is the same as ``init``): the bare base.
- a PEFT adapter folder: that adapter, frozen (any rank and targets; they need not match the policy's).

A reference adapter is one more adapter on the shared base model, named ``<adapter>__reference``, with
``requires_grad=False`` and no dropout. Its rows (the same sequences as the policy's) are one more segment of
the same fused batch, so the reference costs only the adapter's weights: no second model copy and no second
forward pass. ``None`` as a reference name means the base (rows with no adapter).

``reference_folder`` and ``reference_problem`` need no torch (the config and the service API use them).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

__all__ = [
    "REFERENCE_SUFFIX",
    "attach_reference",
    "detach_reference",
    "reference_folder",
    "reference_problem",
]

REFERENCE_SUFFIX = "__reference"
_KEYWORDS = ("base", "init")
_TYPES = ("dpo", "kto")


def reference_folder(task: Any, adapter: Any) -> Path | None:
    """The PEFT folder whose adapter is ``task``'s reference, or None for the bare base model.

    ``task`` is a ``TaskConfig`` (``type``, ``reference``), ``adapter`` its ``AdapterConfig`` (``init_from``).
    Task types without a reference (sft, orpo) get None.
    """
    if task.type not in _TYPES:
        return None
    choice = task.reference
    if choice is None:
        choice = "init" if adapter.init_from else "base"
    if choice == "base":
        return None
    if choice == "init":
        if not adapter.init_from:
            raise ValueError(reference_problem(task, adapter))
        return Path(adapter.init_from)
    return Path(choice)


def reference_problem(task: Any, adapter: Any) -> str | None:
    """Why ``task.reference`` cannot work with ``adapter`` (a config error message), or None."""
    if task.type not in _TYPES or task.reference is None or task.reference == "base":
        return None
    if task.reference == "init":
        if adapter.init_from:
            return None
        return (
            f"is 'init' but adapter {adapter.name!r} has no init_from, so it starts at zero and its starting "
            "policy is the base model; remove reference (or use reference: base), or set the adapter's "
            "init_from to the PEFT folder it starts from"
        )
    folder = Path(task.reference)
    if not (folder / "adapter_config.json").is_file():
        return (
            f"{task.reference!r} is not 'init', 'base' or a PEFT adapter folder (no adapter_config.json "
            "there); give the folder of a saved adapter, e.g. runs/sft/adapters/NAME"
        )
    return None


def attach_reference(model, task: Any, adapter: Any, policy: str) -> str | None:
    """Put ``task``'s reference on ``model`` (frozen) and return its adapter name; None: the base is it.

    ``policy`` is the name of the task's own adapter; the reference is named ``policy + REFERENCE_SUFFIX``.
    Works on a whole model and on a pipeline stage (only the layers it holds get weights).
    """
    from ..lora import adapter_names, adapter_parameters, load_peft, read_peft  # torch: not for the config

    folder = reference_folder(task, adapter)
    if folder is None:
        return None
    name = policy + REFERENCE_SUFFIX
    if name in adapter_names(model):
        raise ValueError(
            f"task {task.name!r}: adapter name {name!r} (its reference) is already on the model; "
            f"do not name an adapter with the suffix {REFERENCE_SUFFIX!r}"
        )
    try:
        spec, _ = read_peft(folder, name)
    except ValueError as e:
        raise ValueError(f"task {task.name!r}: reference {str(folder)!r}: {e}") from None
    # The reference is a fixed function: no dropout, and no gradient ever reaches its weights.
    load_peft(model, folder, name, expect=replace(spec, dropout=0.0))
    for p in adapter_parameters(model, name).values():
        p.requires_grad_(False)
    return name


def detach_reference(model, name: str | None) -> None:
    """Remove a reference adapter that ``attach_reference`` added (None: nothing to remove)."""
    from ..lora import adapter_names, remove_adapter

    if name is not None and name in adapter_names(model):
        remove_adapter(model, name)
