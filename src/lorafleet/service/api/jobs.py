"""``/v1/fine_tuning/jobs``: create, list, retrieve, cancel, pause, resume, events and checkpoints."""

from __future__ import annotations

import re
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request

from ..errors import ERROR_RESPONSES, ApiError
from ..files import JOB_ID_PATTERN, new_adapter_id, new_job_id
from ..jobrequest import JobCreate
from ..jobspec import job_configs
from ..schemas import CheckpointObject, EventObject, JobError, JobObject, ListResponse
from ..store import ACTIVE_STATUSES, EventRecord, JobRecord
from .deps import JobId, Limit, ServiceDep, Tenant, checkpoint_model_id, cursor, present_checkpoints
from .starts import remove_starts, resolve_starts, starting_model, write_starts

__all__ = ["job_object", "router"]

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=ERROR_RESPONSES)


def _ts(x: float | None) -> int | None:
    return None if x is None else int(x)


def _estimated_finish(j: JobRecord, now: float) -> int | None:
    """Linear in steps: started_at + elapsed * total / done, while running with at least one step done."""
    if j.status != "running" or not j.started_at or not j.total_steps or j.step <= 0:
        return None
    return int(j.started_at + (now - j.started_at) * j.total_steps / j.step)


def _job_error(message: str) -> JobError:
    param = next((p for p in ("validation_file", "training_file") if p in message), None)
    return JobError(code="invalid_file" if param else "training_failed", message=message, param=param)


def _model(spec: dict) -> str:
    """A job's ``model``: what it continues from (as OpenAI shows it), else its base model."""
    return (spec.get("init") or {}).get("model") or spec["model"]


def job_object(j: JobRecord) -> JobObject:
    """The OpenAI job object of a stored job (``fine_tuned_model``: its adapter id, once succeeded)."""
    s = j.spec
    kind = s["method"]["type"]
    hp = s["method"][kind]["hyperparameters"]
    return JobObject(
        id=j.id, model=_model(s), created_at=int(j.created_at), started_at=_ts(j.started_at),
        finished_at=_ts(j.finished_at), status=j.status, training_file=s["training_file"],
        validation_file=s.get("validation_file"), hyperparameters=hp, method=s["method"],
        fine_tuned_model=j.adapter_id if j.status == "succeeded" else None, organization_id=j.tenant,
        result_files=[], seed=s["seed"], estimated_finish=_estimated_finish(j, time.time()),
        trained_tokens=j.trained_tokens if j.status == "succeeded" else None,
        error=_job_error(j.error) if j.error else None, metadata=s.get("metadata") or {}, integrations=[],
        user_provided_suffix=s.get("suffix"),
        lorafleet={**s["lorafleet"], "adapter_id": j.adapter_id, "step": j.step, "total_steps": j.total_steps},
    )  # fmt: skip


def _event_object(e: EventRecord) -> EventObject:
    return EventObject(
        id=f"ftevent-{e.seq}", created_at=e.created_at, level=e.level, type=e.type, message=e.message,
        data=e.data,
    )  # fmt: skip


@router.post("", response_model=JobObject)
def create_job(body: JobCreate, tenant_: Tenant, svc: ServiceDep) -> JobObject:
    """Create a job. It starts in ``validating_files``; the worker queues it and trains it. ``model`` may name
    one of the tenant's fine-tuned models or checkpoints to continue from (``api/starts.py``). 503 with
    ``Retry-After`` while the data folder cannot be written."""
    store, dd = svc.store, svc.dd
    init = starting_model(svc, tenant_, body.model)
    if init is None and body.model is not None and body.model != svc.served_model:
        # a fleet serves the base models its workers announce, besides this server's own
        fleet = svc.base_models()
        if body.model not in fleet:
            raise ApiError(
                400, f"model {body.model!r} is not served here: this fleet fine-tunes "
                f"{', '.join(map(repr, fleet))} (omit 'model' for {svc.served_model!r})", param="model",
            )  # fmt: skip
    for param in ("training_file", "validation_file"):
        fid = getattr(body, param)
        if fid is not None and store.get_file(tenant_, fid) is None:
            raise ApiError(
                400, f"{param} {fid!r} does not exist: upload it with POST /v1/files and pass the id it "
                "returns", param=param, code="file_not_found",
            )  # fmt: skip
    try:
        spec = body.normalized()
    except ValueError as e:
        raise ApiError(400, str(e), param="hyperparameters", code="invalid_hyperparameters") from None
    spec["model"] = body.model or svc.served_model
    starts = resolve_starts(svc, tenant_, body, spec, init)
    job = JobRecord(
        id=new_job_id(), tenant=tenant_, status="validating_files", spec=spec,
        adapter_id=new_adapter_id(body.suffix), created_at=time.time(), priority=body.lorafleet.priority,
    )  # fmt: skip
    files = {}
    for fid in filter(None, (body.training_file, body.validation_file)):
        rec = store.get_file(tenant_, fid)
        files[fid] = (dd.file_path(fid), rec.format if rec else "")
    write_starts(svc, job.id, starts, spec["model"])
    try:
        try:  # what the engine's config would refuse is refused now, not after the job was queued
            job_configs(spec, job.id, job.adapter_id, files, svc.settings.engine, dd.engine)
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_job") from None
        dd.check_writable()  # a job that could not checkpoint is a 503 now (StorageUnavailable), not failed later
        store.add_job(job)
    except BaseException:  # the job does not exist: neither do its snapshots
        remove_starts(svc, job.id)
        raise
    store.add_events([EventRecord(job.id, "message", "Created fine-tuning job", time.time())])
    return job_object(job)


@router.get("", response_model=ListResponse[JobObject])
def list_jobs(
    request: Request,
    tenant_: Tenant,
    svc: ServiceDep,
    after: Annotated[str | None, Query(pattern=JOB_ID_PATTERN)] = None,
    limit: Limit = 20,
) -> ListResponse[JobObject]:
    """The tenant's jobs, newest first; pass the last id as ``after`` for the next page. ``metadata[KEY]=VALUE``
    (repeatable) keeps only jobs whose metadata has those pairs."""
    wanted = _metadata_filter(request)
    if not wanted:
        rows, more = svc.store.list_jobs(tenant_, after, limit)
        return ListResponse[JobObject](data=[job_object(j) for j in rows], has_more=more)
    found: list[JobRecord] = []
    more = True
    while more and len(found) <= limit:  # one extra match tells has_more
        rows, more = svc.store.list_jobs(tenant_, after, 100)
        found += [j for j in rows if _matches(j, wanted)]
        after = rows[-1].id if rows else None
    return ListResponse[JobObject](data=[job_object(j) for j in found[:limit]], has_more=len(found) > limit)


_METADATA_KEY = re.compile(r"^metadata\[(.{1,64})\]$")


def _metadata_filter(request: Request) -> dict[str, str]:
    wanted = {}
    for key, value in request.query_params.multi_items():
        m = _METADATA_KEY.match(key)
        if m:
            wanted[m.group(1)] = value
        elif key.startswith("metadata"):
            raise ApiError(400, f"query parameter {key!r}: filter with metadata[KEY]=VALUE", param="metadata")
    return wanted


def _matches(job: JobRecord, wanted: dict[str, str]) -> bool:
    have = job.spec.get("metadata") or {}
    return all(have.get(k) == v for k, v in wanted.items())


@router.get("/{job_id}", response_model=JobObject)
def retrieve_job(job_id: JobId, tenant_: Tenant, svc: ServiceDep) -> JobObject:
    return job_object(svc.get_job(tenant_, job_id))


@router.post("/{job_id}/cancel", response_model=JobObject)
def cancel_job(job_id: JobId, tenant_: Tenant, svc: ServiceDep) -> JobObject:
    """Cancel a job that has not finished; the worker stops training it at its next micro-batch."""
    job = svc.get_job(tenant_, job_id)
    if not svc.store.transition(job_id, "cancelled", ACTIVE_STATUSES, finished_at=time.time()):
        job = svc.get_job(tenant_, job_id)
        raise ApiError(
            409, f"job {job_id} is already {job.status}; only jobs in {', '.join(ACTIVE_STATUSES)} can be "
            "cancelled", code="job_finished",
        )  # fmt: skip
    svc.store.add_events([EventRecord(job.id, "message", "Job cancelled by the user", time.time())])
    return job_object(svc.get_job(tenant_, job_id))


@router.post("/{job_id}/pause", response_model=JobObject)
def pause_job(job_id: JobId, tenant_: Tenant, svc: ServiceDep) -> JobObject:
    """Pause a job: it leaves the engine at its next checkpoint (at once if it has not started) and waits,
    ``paused``, for ``resume``."""
    svc.get_job(tenant_, job_id)
    if not svc.store.transition(job_id, "paused", ("validating_files", "queued", "running")):
        job = svc.get_job(tenant_, job_id)
        raise ApiError(
            409, f"job {job_id} is {job.status}: only unfinished jobs can be paused", code="job_not_running"
        )
    svc.store.add_events([EventRecord(job_id, "message", "Job paused by the user", time.time())])
    return job_object(svc.get_job(tenant_, job_id))


@router.post("/{job_id}/resume", response_model=JobObject)
def resume_job(job_id: JobId, tenant_: Tenant, svc: ServiceDep) -> JobObject:
    """Resume a paused job: back to ``queued``, then on from its last checkpoint."""
    svc.get_job(tenant_, job_id)
    if not svc.store.transition(job_id, "queued", ("paused",)):
        job = svc.get_job(tenant_, job_id)
        raise ApiError(
            409, f"job {job_id} is {job.status}, not paused: only paused jobs resume", code="job_not_paused"
        )
    svc.store.add_events([EventRecord(job_id, "message", "Job resumed by the user", time.time())])
    return job_object(svc.get_job(tenant_, job_id))


@router.get("/{job_id}/events", response_model=ListResponse[EventObject])
def list_events(
    job_id: JobId,
    tenant_: Tenant,
    svc: ServiceDep,
    after: Annotated[str | None, Query(pattern=r"^ftevent-[0-9]{1,18}$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    order: Annotated[str, Query(pattern="^(asc|desc)$", description="desc: newest first")] = "desc",
) -> ListResponse[EventObject]:
    """Status messages, one ``metrics`` event per optimizer step (``data``: step, train_loss,
    learning_rate, tokens, elapsed_s) and, after each evaluation, a ``message`` event (``data``: step,
    valid_loss, valid_*). Append-only: a new event gets a larger id, a listed one keeps its id and place;
    ``order=asc`` with ``after`` follows a running job. After a cancel, "Job cancelled by the user" is the
    job's last event."""
    svc.get_job(tenant_, job_id)
    rows, more = svc.store.list_events(job_id, cursor(after, "ftevent-"), limit, ascending=order == "asc")
    return ListResponse[EventObject](data=[_event_object(e) for e in rows], has_more=more)


@router.get("/{job_id}/checkpoints", response_model=ListResponse[CheckpointObject])
def list_checkpoints(
    job_id: JobId,
    tenant_: Tenant,
    svc: ServiceDep,
    after: Annotated[str | None, Query(pattern=r"^ftckpt-[0-9]{1,18}$")] = None,
    limit: Limit = 20,
) -> ListResponse[CheckpointObject]:
    """The job's checkpoints that are on disk, newest first; each is also a model
    (``fine_tuned_model_checkpoint``)."""
    job = svc.get_job(tenant_, job_id)
    rows, more = present_checkpoints(svc.store, job_id, cursor(after, "ftckpt-"), limit)
    data = [
        CheckpointObject(
            id=f"ftckpt-{c.seq}",
            created_at=int(c.created_at),
            fine_tuning_job_id=job_id,
            fine_tuned_model_checkpoint=checkpoint_model_id(job.adapter_id, c.step),
            step_number=c.step,
            metrics={"step": c.step, **c.metrics},
        )
        for c in rows
    ]
    return ListResponse[CheckpointObject](data=data, has_more=more)
