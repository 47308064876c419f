"""What the routers share: the ``Service`` context, the tenant dependency and parameter types."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .. import auth
from ..errors import ApiError, not_found
from ..files import ADAPTER_ID_PATTERN, FILE_ID_PATTERN, JOB_ID_PATTERN, DataDir
from ..jobspec import model_name
from ..store import CheckpointRecord, JobRecord, Store

if TYPE_CHECKING:
    from ..app import ServiceSettings

__all__ = [
    "AdapterId",
    "FileId",
    "JobId",
    "Limit",
    "Service",
    "ServiceDep",
    "Tenant",
    "checkpoint_model_id",
    "checkpoint_on_disk",
    "cursor",
    "model_name",
    "present_checkpoints",
]


@dataclass
class Service:
    """The app's shared state (``app.state.service``): the store, the data folder and the settings."""

    store: Store
    dd: DataDir
    settings: ServiceSettings
    served_model: str

    def base_models(self) -> list[str]:
        """The base models the fleet fine-tunes: this server's own, and every one a worker announced."""
        return sorted({self.served_model} | {w.base_model for w in self.store.list_workers()})

    def get_job(self, tenant: str, job_id: str) -> JobRecord:
        """The tenant's job, or the 404 (also for another tenant's job)."""
        job = self.store.get_job(tenant, job_id)
        if job is None:
            raise not_found("fine-tuning job", job_id)
        return job


def _service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(_service)]

_bearer = HTTPBearer(
    auto_error=False, description="an API token from `lorafleet tokens create --tenant NAME`"
)


def _tenant(
    request: Request, _declared: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
) -> str:
    """The FastAPI dependency every /v1 route takes: the tenant of the request's bearer token. (``_declared``
    puts the bearer scheme into the OpenAPI schema; the header is checked here, with this API's messages.)"""
    try:
        return auth.authenticate(request.app.state.store, request.headers.get("authorization"))
    except auth.AuthError as e:
        raise ApiError(401, str(e), type="authentication_error", code="invalid_api_key") from None


Tenant = Annotated[str, Depends(_tenant)]
FileId = Annotated[str, PathParam(pattern=FILE_ID_PATTERN, description="file-<24 hex>")]
JobId = Annotated[str, PathParam(pattern=JOB_ID_PATTERN, description="ftjob-<24 hex>")]
AdapterId = Annotated[str, PathParam(pattern=ADAPTER_ID_PATTERN, description="adapter-[suffix-]<16 hex>")]
Limit = Annotated[int, Query(ge=1, le=100, description="page size")]


def checkpoint_model_id(adapter_id: str, step: int) -> str:
    """The model id of a job's checkpoint at ``step``: ``<adapter id>:ckpt-step-<step>``."""
    return f"{adapter_id}:ckpt-step-{step}"


def checkpoint_on_disk(c: CheckpointRecord) -> bool:
    """Whether a recorded checkpoint is still there: the engine prunes all but the newest ones, and an
    operator may remove any; the store keeps the record either way."""
    return (Path(c.path) / "adapter.safetensors").is_file()


def present_checkpoints(
    store: Store, job_id: str, after: int | None, limit: int
) -> tuple[list[CheckpointRecord], bool]:
    """A page of the job's checkpoints that are on disk (``checkpoint_on_disk``), newest first, and whether
    more follow; the store is read in pages until the page is full."""
    found: list[CheckpointRecord] = []
    more = True
    while more and len(found) <= limit:  # one extra tells has_more
        rows, more = store.list_checkpoints(job_id, after, 100)
        found += [c for c in rows if checkpoint_on_disk(c)]
        if not rows:
            break
        after = rows[-1].seq
    return found[:limit], len(found) > limit


def cursor(value: str | None, prefix: str) -> int | None:
    """The sequence number in a ``<prefix><digits>`` page cursor (``after``); 400 for anything else."""
    if value is None:
        return None
    digits = value.removeprefix(prefix)
    if not digits.isdigit() or len(digits) > 18:
        raise ApiError(
            400, f"after={value!r} is not a cursor: pass the id of the last object of a page", param="after"
        )
    return int(digits)
