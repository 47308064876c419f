"""A job's starting adapter and reference among the tenant's models, and the snapshots it trains from.

``model`` in a job request names the served base model, or (as OpenAI fine-tunes a fine-tuned model) one of
the tenant's fine-tuned models (``adapter-...``, a succeeded job's ``fine_tuned_model``) or checkpoints
(``adapter-...:ckpt-step-N``): the job then continues from that adapter. It trains on the source job's base
model with the source's adapter settings (type, rank, alpha, rsLoRA and targets must stay as they are, since
the job trains that adapter on; ``dropout`` may change).

``method.dpo|kto.hyperparameters.reference`` picks the frozen reference of a preference job: ``auto`` (the
default: ``init`` when the job continues from a model, else ``base``), ``base``, ``init`` (the starting
adapter, which needs ``model`` to name one), or the id of another of the tenant's fine-tuned models or
checkpoints on the same base model. The stored job holds the resolved choice.

Both the starting adapter and a reference model are copied when the job is created into
``jobspec.start_folder`` (``init`` and ``reference``, PEFT folders; a checkpoint gets the
``adapter_config.json`` of its job's adapter), so that deleting the source model or pruning its checkpoints
later changes nothing for the job. Another tenant's model is the same 404 as a missing one. No torch here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config.peft import CONFIG_NAME, WEIGHTS_NAME, peft_adapter_config
from ..errors import ApiError
from ..files import ADAPTER_ID_PATTERN, StorageUnavailable
from ..jobrequest import PREFERENCE_METHODS, JobCreate
from ..jobspec import REFERENCE_KEYWORDS, start_folder
from .deps import Service
from .models import ResolvedModel, resolve_model

__all__ = ["Starts", "remove_starts", "resolve_starts", "starting_model", "write_starts"]

# the adapter settings that make the adapter what it is: a job that continues from a model keeps them
_SHAPE = ("type", "rank", "alpha", "use_rslora", "target_modules")
_CHECKPOINT_WEIGHTS = "adapter.safetensors"  # train/checkpoint.py: the adapter's tensors under PEFT keys


@dataclass(frozen=True)
class Starts:
    """The models a job's snapshots are taken from: its starting adapter and its reference (None: none)."""

    init: ResolvedModel | None = None
    reference: ResolvedModel | None = None


def _names_a_model(model_id: str) -> bool:
    return re.match(ADAPTER_ID_PATTERN, model_id.split(":", 1)[0]) is not None


def starting_model(svc: Service, tenant: str, model_id: str | None) -> ResolvedModel | None:
    """The tenant's fine-tuned model or checkpoint that ``model`` names, or None when it names no adapter
    (the base model, or a name the caller answers as not served). 404 when it is not the tenant's."""
    if model_id is None or model_id in svc.base_models() or not _names_a_model(model_id):
        return None
    return resolve_model(svc, tenant, model_id)


def _inherited_adapter(body: JobCreate, source: dict[str, Any], model_id: str) -> dict[str, Any]:
    requested = body.lorafleet.adapter.model_dump(mode="json")
    out = dict(source)
    for field in sorted(body.adapter_fields_given()):
        want, have = requested[field], source[field]
        if field in _SHAPE and (sorted(want) != sorted(have) if field == "target_modules" else want != have):
            raise ApiError(
                400, f"lorafleet.adapter.{field} is {want!r} but the model {model_id!r} that the job continues "
                f"from has {have!r}: a job that continues from a model trains that adapter on; remove {field} "
                "(it is inherited) or start from the base model",
                param=f"lorafleet.adapter.{field}", code="invalid_job",
            )  # fmt: skip
        out[field] = want
    return out


def _reference_model(svc: Service, tenant: str, ref: str, base: str, param: str) -> ResolvedModel:
    try:
        m = resolve_model(svc, tenant, ref)
    except ApiError as e:
        raise ApiError(e.status, e.message, type=e.type, param=param, code=e.code) from None
    trained_on = (m.job.spec.get("model") if m.job is not None else None) or svc.served_model
    if m.job is not None and trained_on != base:
        raise ApiError(
            400, f"{param} {ref!r} was trained on {trained_on!r}, but this job trains on {base!r}: a reference "
            "must share the job's base model", param=param, code="invalid_job",
        )  # fmt: skip
    return m


def resolve_starts(
    svc: Service, tenant: str, body: JobCreate, spec: dict[str, Any], init: ResolvedModel | None
) -> Starts:
    """Complete the stored request ``spec`` (``JobCreate.normalized()``) for its starting model ``init``
    (``starting_model``): the base model it trains on, ``spec["init"]``, the inherited adapter settings, and
    the resolved reference. Returns what ``write_starts`` snapshots; raises ``ApiError`` (400, 404)."""
    kind = spec["method"]["type"]
    hp = spec["method"][kind]["hyperparameters"]
    if init is not None:
        src = init.job.spec
        spec["model"] = src.get("model") or svc.served_model
        spec["init"] = {"model": init.id}
        spec["lorafleet"]["adapter"] = _inherited_adapter(body, src["lorafleet"]["adapter"], init.id)
    if kind not in PREFERENCE_METHODS:
        return Starts(init=init)
    if kind == "dpo" and spec["lorafleet"]["preference"]["objective"] == "orpo":
        hp.pop("reference", None)  # orpo has none (an explicit one was refused by JobCreate)
        return Starts(init=init)
    param = f"method.{kind}.hyperparameters.reference"
    ref, reference = hp.get("reference", "auto"), None
    if ref == "auto":
        ref = "init" if init is not None else "base"
    elif ref == "init" and init is None:
        raise ApiError(
            400, f"{param} is 'init' but the job starts from the base model, which is then its reference: "
            "set model to the fine-tuned model or checkpoint to continue from, or use reference 'base'",
            param=param, code="invalid_job",
        )  # fmt: skip
    elif ref == spec["model"]:
        ref = "base"
    elif ref not in REFERENCE_KEYWORDS:
        reference = _reference_model(svc, tenant, ref, spec["model"], param)
        if reference.job is None:  # the base model named by its id
            ref, reference = "base", None
    hp["reference"] = ref
    return Starts(init=init, reference=reference)


def _snapshot(m: ResolvedModel, dest: Path, base: str) -> None:
    """Copy ``m``'s adapter into ``dest`` as a PEFT folder."""
    dest.mkdir(parents=True)
    assert m.job is not None and m.adapter_dir is not None
    if m.id == m.job.adapter_id:  # a fine-tuned model: its PEFT folder
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copyfile(m.adapter_dir / name, dest / name)
        return
    # a checkpoint: its weights (PEFT keys) and the config of its job's adapter
    shutil.copyfile(m.adapter_dir / _CHECKPOINT_WEIGHTS, dest / WEIGHTS_NAME)
    a = m.job.spec["lorafleet"]["adapter"]
    config = peft_adapter_config(
        a["type"], a["rank"], a["alpha"], a["dropout"], a["use_rslora"], a["target_modules"], base
    )
    with open(dest / CONFIG_NAME, "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())


def write_starts(svc: Service, job_id: str, starts: Starts, base: str) -> None:
    """Snapshot ``starts`` into the job's start folder, all or nothing. A source that vanished meanwhile is
    the 404 of a missing model; a data folder that cannot be written is ``StorageUnavailable`` (503)."""
    if starts.init is None and starts.reference is None:
        return
    root = start_folder(svc.dd.engine, job_id)
    tmp = root.with_name(root.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        for role, m in (("init", starts.init), ("reference", starts.reference)):
            if m is not None:
                _snapshot(m, tmp / role, base)
        os.replace(tmp, root)
    except FileNotFoundError:
        shutil.rmtree(tmp, ignore_errors=True)
        gone = next(m.id for m in (starts.init, starts.reference) if m is not None)
        raise ApiError(
            404, f"the model {gone!r} was deleted while the job was being created: list yours with "
            "GET /v1/models", param="model", code="model_not_found",
        ) from None  # fmt: skip
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageUnavailable(e) from e


def remove_starts(svc: Service, job_id: str) -> None:
    """Remove a job's snapshots (a job that was refused after ``write_starts``)."""
    shutil.rmtree(start_folder(svc.dd.engine, job_id), ignore_errors=True)
