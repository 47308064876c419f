"""``/v1/models``: the base models, the tenant's fine-tuned models and their checkpoints, as OpenAI models.

Model ids: the base model's name (``GET /healthz``'s ``model``; in a fleet, also every base model a
worker announces: ``/healthz``'s ``workers``); a fine-tuned model is the adapter id its job
reports as ``fine_tuned_model``; a checkpoint is ``<adapter id>:ckpt-step-<N>`` (its
``fine_tuned_model_checkpoint``). A fine-tuned model exists while its adapter folder does: ``DELETE``
removes the folder (the job stays, as at OpenAI). Another tenant's model is the same 404 as a missing one.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter
from fastapi import Path as PathParam

from ..errors import ERROR_RESPONSES, ApiError
from ..files import ADAPTER_ID_PATTERN
from ..schemas import DeletedObject, ListResponse, ModelObject
from ..store import JobRecord
from .deps import Service, ServiceDep, Tenant, checkpoint_model_id, checkpoint_on_disk

__all__ = ["ResolvedModel", "resolve_model", "router"]

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)

_CKPT_RE = re.compile(ADAPTER_ID_PATTERN.rstrip("$") + r":ckpt-step-([0-9]{1,9})$")
_OWNER = "lorafleet"


@dataclass(frozen=True)
class ResolvedModel:
    """What a model id names: the base (``adapter_dir`` None), a fine-tuned model or a checkpoint."""

    id: str
    created: int
    owned_by: str
    adapter_dir: Path | None
    job: JobRecord | None = None

    def object(self, base: str) -> ModelObject:
        """The model object; a fine-tuned model's parent is the base its job trained on (``base`` when the
        job names none)."""
        return ModelObject(
            id=self.id,
            created=self.created,
            owned_by=self.owned_by,
            parent=None if self.job is None else self.job.spec.get("model") or base,
        )


def _fine_tuned(svc: Service, job: JobRecord) -> ResolvedModel | None:
    folder = svc.dd.adapter_dir(job.adapter_id)
    if job.status != "succeeded" or not (folder / "adapter_config.json").is_file():
        return None
    return ResolvedModel(job.adapter_id, int(job.finished_at or job.created_at), job.tenant, folder, job)


def _checkpoints(svc: Service, job: JobRecord) -> list[ResolvedModel]:
    out, after = [], None
    while True:
        rows, more = svc.store.list_checkpoints(job.id, after, 100)
        for c in rows:
            if checkpoint_on_disk(c):  # pruned or removed ones are gone
                mid = checkpoint_model_id(job.adapter_id, c.step)
                out.append(ResolvedModel(mid, int(c.created_at), job.tenant, Path(c.path), job))
        if not more or not rows:
            return out
        after = rows[-1].seq


def _base(svc: Service, name: str | None = None) -> ResolvedModel:
    """A base model: this server's own (created: its files' time), or one a fleet's worker announced (its
    files are on the worker's machine: created 0)."""
    if name is not None and name != svc.served_model:
        return ResolvedModel(name, 0, _OWNER, None)
    path = Path(svc.settings.base_model)
    created = int(path.stat().st_mtime) if path.exists() else 0
    return ResolvedModel(svc.served_model, created, _OWNER, None)


def resolve_model(svc: Service, tenant: str, model_id: str, fleet: bool = False) -> ResolvedModel:
    """The model ``model_id`` names for ``tenant``; 404 (``model_not_found``) when it names none of theirs.
    ``fleet``: also the base models the fleet's workers announce (listing; inference runs on this server's
    own base model only)."""
    if model_id == svc.served_model:
        return _base(svc)
    if fleet and model_id in svc.base_models():
        return _base(svc, model_id)
    m = _CKPT_RE.match(model_id)
    adapter_id = model_id.rsplit(":", 1)[0] if m else model_id
    job = svc.store.get_adapter_job(tenant, adapter_id) if re.match(ADAPTER_ID_PATTERN, adapter_id) else None
    found = None
    if job is not None and m is None:
        found = _fine_tuned(svc, job)
    elif job is not None:
        found = next((c for c in _checkpoints(svc, job) if c.id == model_id), None)
    if found is None:
        raise ApiError(
            404, f"the model {model_id!r} does not exist or you do not have access to it: list yours with "
            "GET /v1/models", type="invalid_request_error", param="model", code="model_not_found",
        )  # fmt: skip
    return found


def _all_jobs(svc: Service, tenant: str) -> list[JobRecord]:
    jobs, after = [], None
    while True:
        rows, more = svc.store.list_jobs(tenant, after, 100)
        jobs += rows
        if not more or not rows:
            return jobs
        after = rows[-1].id


@router.get("", response_model=ListResponse[ModelObject])
def list_models(tenant_: Tenant, svc: ServiceDep) -> ListResponse[ModelObject]:
    """The fleet's base models (this server's first), then the tenant's fine-tuned models and checkpoints,
    newest job first."""
    found = [_base(svc)] + [_base(svc, b) for b in svc.base_models() if b != svc.served_model]
    for job in _all_jobs(svc, tenant_):
        ft = _fine_tuned(svc, job)
        found += ([ft] if ft else []) + _checkpoints(svc, job)
    return ListResponse[ModelObject](data=[m.object(svc.served_model) for m in found], has_more=False)


_ModelId = PathParam(max_length=600, description="base, fine-tuned model or checkpoint id")


@router.get("/{model_id}", response_model=ModelObject)
def retrieve_model(tenant_: Tenant, svc: ServiceDep, model_id: str = _ModelId) -> ModelObject:
    return resolve_model(svc, tenant_, model_id, fleet=True).object(svc.served_model)


@router.delete("/{model_id}", response_model=DeletedObject)
def delete_model(tenant_: Tenant, svc: ServiceDep, model_id: str = _ModelId) -> DeletedObject:
    """Delete a fine-tuned model (its adapter files and download); the base and checkpoints stay."""
    m = resolve_model(svc, tenant_, model_id, fleet=True)
    if m.job is None:
        raise ApiError(403, f"{model_id!r} is the base model; it cannot be deleted", type="permission_error")
    if m.id != m.job.adapter_id:
        raise ApiError(
            400, f"{model_id!r} is a checkpoint: delete its fine-tuned model {m.job.adapter_id!r} instead",
            param="model", code="checkpoint_not_deletable",
        )  # fmt: skip
    folder = svc.dd.adapter_dir(m.id)
    svc.dd.check_writable(svc.dd.exports, folder.parent)  # a 503 while they cannot be written, not "deleted"
    svc.dd.export_zip(m.id).unlink(missing_ok=True)
    if folder.exists():
        shutil.rmtree(folder)
    return DeletedObject(id=m.id, object="model", deleted=True)
