"""``/v1/adapters``: the adapters of succeeded jobs, and their download as a zip of the PEFT folder."""

from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from ..errors import ERROR_RESPONSES, ApiError, not_found
from ..files import JOB_ID_PATTERN
from ..schemas import AdapterObject, ListResponse
from ..store import JobRecord
from .deps import AdapterId, Limit, Service, ServiceDep, Tenant

__all__ = ["router", "succeeded_adapter_job"]

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], responses=ERROR_RESPONSES)


def succeeded_adapter_job(svc: Service, tenant: str, adapter_id: str) -> JobRecord:
    """The tenant's succeeded job that trained ``adapter_id``: 404 if none, 409 while it is not done."""
    job = svc.store.get_adapter_job(tenant, adapter_id)
    if job is None:
        raise not_found("adapter", adapter_id)
    if job.status != "succeeded":
        raise ApiError(
            409, f"adapter {adapter_id} is not ready: its job {job.id} is {job.status}",
            code="adapter_not_ready",
        )  # fmt: skip
    return job


def _adapter_object(job: JobRecord) -> AdapterObject:
    a = job.spec["lorafleet"]["adapter"]
    return AdapterObject(
        id=job.adapter_id, created_at=int(job.finished_at or job.created_at), fine_tuning_job_id=job.id,
        base_model=job.spec["model"], type=a["type"], rank=a["rank"],
    )  # fmt: skip


def _zip_adapter(src: Path, dest: Path, top: str) -> None:
    """Zip the PEFT folder ``src`` as ``top/...`` into ``dest`` atomically (the adapter never changes once
    written, so the zip is built once and served as a file)."""
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}.{time.monotonic_ns()}")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(src.rglob("*")):
                if p.is_file() and not p.is_symlink():
                    zf.write(p, f"{top}/{p.relative_to(src).as_posix()}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@router.get("", response_model=ListResponse[AdapterObject])
def list_adapters(
    tenant_: Tenant,
    svc: ServiceDep,
    after: Annotated[str | None, Query(pattern=JOB_ID_PATTERN, description="job id cursor")] = None,
    limit: Limit = 20,
) -> ListResponse[AdapterObject]:
    """Adapters of the tenant's succeeded jobs, newest job first (``after`` is a job id cursor)."""
    rows, more = svc.store.list_jobs(tenant_, after, limit, status="succeeded")
    return ListResponse[AdapterObject](data=[_adapter_object(j) for j in rows], has_more=more)


@router.get("/{adapter_id}", response_model=AdapterObject)
def get_adapter(adapter_id: AdapterId, tenant_: Tenant, svc: ServiceDep) -> AdapterObject:
    return _adapter_object(succeeded_adapter_job(svc, tenant_, adapter_id))


@router.get(
    "/{adapter_id}/download",
    responses={200: {"content": {"application/zip": {}}, "description": "the PEFT folder"}},
    response_class=FileResponse,
)
def download_adapter(adapter_id: AdapterId, tenant_: Tenant, svc: ServiceDep) -> FileResponse:
    """The adapter as a zip of its PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    succeeded_adapter_job(svc, tenant_, adapter_id)
    src = svc.dd.adapter_dir(adapter_id)
    if not (src / "adapter_config.json").is_file():
        raise ApiError(
            409, f"adapter {adapter_id} has no files on the server (was DATA_DIR/engine cleaned?)",
            code="adapter_missing",
        )  # fmt: skip
    dest = svc.dd.export_zip(adapter_id)
    if not dest.is_file():
        _zip_adapter(src, dest, adapter_id)
    return FileResponse(dest, media_type="application/zip", filename=f"{adapter_id}.zip")
