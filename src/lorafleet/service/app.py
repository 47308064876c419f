"""The REST API: files, fine-tuning jobs, events, checkpoints, adapters and the dashboard.

    lorafleet serve --base-model path/to/model --data-dir ./service-data     # API + worker
    curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8000/v1/fine_tuning/jobs

This process never imports torch (``tests/test_service.py::test_api_process_never_imports_torch``): it validates requests, writes
them to the store, and reads back what the worker (``worker.py``, a separate process) records. Every
error is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status whose message says what
was wrong and how to fix it; a tenant asking for another tenant's object gets the same 404 as for an
object that does not exist.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import auth
from .files import (
    ADAPTER_ID_PATTERN,
    FILE_ID_PATTERN,
    JOB_ID_PATTERN,
    DataDir,
    UploadError,
    new_adapter_id,
    new_file_id,
    new_job_id,
    save_upload,
)
from .jobspec import EngineSettings, job_configs, model_name
from .schemas import (
    AdapterObject,
    CheckpointObject,
    DeletedObject,
    ErrorResponse,
    EventObject,
    FileObject,
    Health,
    JobCreate,
    JobObject,
    ListResponse,
)
from .store import (
    ACTIVE_STATUSES,
    EventRecord,
    FileRecord,
    JobRecord,
    QuotaExceeded,
    Store,
    StoreUnavailable,
    WorkerRecord,
    default_store_url,
    open_store,
)

__all__ = ["ApiError", "ServiceSettings", "create_app", "model_name"]

# a worker heartbeat older than this marks the worker as not alive in /healthz
_HEARTBEAT_STALE_S = 15.0
_JSON_BODY_LIMIT = 1 << 20  # requests other than uploads are small JSON documents
_RETRY_AFTER_S = 5  # what a 503 asks the client to wait while the store is unreachable
_QUOTA_RETRY_AFTER_S = 30  # what a 429 asks: jobs finish, files get deleted


@dataclass
class ServiceSettings:
    """What the API needs to know; ``lorafleet serve`` fills it from its flags."""

    data_dir: Path
    base_model: str
    max_upload_bytes: int = 100 * 1024 * 1024
    engine: EngineSettings | None = None  # the worker's settings, to validate jobs (None: the defaults)
    store_url: str | None = None  # None: sqlite:///DATA_DIR/lorafleet.db

    def __post_init__(self) -> None:
        if self.engine is None:
            self.engine = EngineSettings(base_model=self.base_model)


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, errors: list[str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.errors = (
            status, message, type, param, code, errors,
        )  # fmt: skip


def _error_json(status: int, message: str, type: str, param=None, code=None, errors=None) -> JSONResponse:
    body: dict[str, Any] = {"message": message, "type": type, "param": param, "code": code}
    if errors:
        body["errors"] = errors
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _not_found(kind: str, id_: str) -> ApiError:
    return ApiError(404, f"no {kind} with id {id_!r}", type="not_found_error", code="not_found")


_ERRORS = {
    s: {"model": ErrorResponse, "description": d}
    for s, d in {
        400: "invalid request",
        401: "missing or invalid API token",
        404: "not found (or owned by another tenant)",
        409: "conflict with the object's state",
        413: "request too large",
        422: "request fails validation",
        429: "over one of the tenant's quotas (the message names it; retry after Retry-After)",
        503: "the job store is unavailable: retry after the Retry-After header's seconds",
    }.items()
}


class _BodyTooLarge(Exception):
    pass


class _BodyLimit:
    """ASGI middleware: answers 413 for bodies over the limit, before reading them when Content-Length
    says so, else as soon as the streamed bytes pass it (so an oversize upload is never stored whole)."""

    def __init__(self, app, upload_limit: int) -> None:
        self.app = app
        self.upload_limit = upload_limit

    def _response(self, limit: int) -> JSONResponse:
        return _error_json(
            413,
            f"request body is larger than the limit of {limit} bytes: split the file, or start the server "
            "with a larger --max-upload-mb",
            "invalid_request_error",
            code="request_too_large",
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = scope["path"] == "/v1/files" and scope["method"] == "POST"
        # multipart framing around the file adds a few hundred bytes; allow 64 KiB of it
        limit = self.upload_limit + 65536 if is_upload else _JSON_BODY_LIMIT
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await self._response(limit)(scope, receive, send)
            return
        state = {"n": 0, "over": False, "answered": False}

        async def limited_receive():
            msg = await receive()
            if msg["type"] == "http.request":
                state["n"] += len(msg.get("body", b""))
                if state["n"] > limit:
                    state["over"] = True
                    raise _BodyTooLarge
            return msg

        async def guarded_send(msg):
            if state["over"]:  # the app answered an error for the interrupted body: answer 413 instead
                if not state["answered"]:
                    state["answered"] = True
                    await self._response(limit)(scope, receive, send)
                return
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not state["answered"]:
                state["answered"] = True
                await self._response(limit)(scope, receive, send)


def _describe_validation(exc: RequestValidationError) -> tuple[str, list[str], str | None]:
    msgs = []
    param = None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"] or ["body"]
        where = ".".join(loc)
        param = param or where
        kind = err.get("type", "")
        if kind == "extra_forbidden":
            msgs.append(f"{where}: unknown field; remove it (see the schema at /docs for the known fields)")
        elif kind == "missing":
            msgs.append(f"{where}: required field is missing")
        elif isinstance(err.get("input"), bytes) and where == "body":
            msgs.append("request body is not a JSON object: send JSON with 'Content-Type: application/json'")
        elif kind == "json_invalid":
            msgs.append(f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
        else:
            got = err.get("input")
            shown = f" (got {got!r:.80})" if isinstance(got, str | int | float | bool) else ""
            msgs.append(f"{where}: {err.get('msg')}{shown}")
    return "; ".join(msgs) or "invalid request", msgs, param


def _ts(x: float | None) -> int | None:
    return None if x is None else int(x)


def _file_obj(f: FileRecord) -> FileObject:
    return FileObject(
        id=f.id, bytes=f.bytes, created_at=int(f.created_at), filename=f.filename, purpose=f.purpose,
        num_rows=f.num_rows, format=f.format,
    )  # fmt: skip


def _job_obj(j: JobRecord) -> JobObject:
    s = j.spec
    return JobObject(
        id=j.id, model=s["model"], created_at=int(j.created_at), started_at=_ts(j.started_at),
        finished_at=_ts(j.finished_at), status=j.status, training_file=s["training_file"],
        validation_file=s.get("validation_file"), adapter=s["adapter"], hyperparameters=s["hyperparameters"],
        method=s.get("method") or {},
        suffix=s.get("suffix"), priority=j.priority,
        fine_tuned_adapter=j.adapter_id if j.status == "succeeded" else None, step=j.step,
        total_steps=j.total_steps, trained_tokens=j.trained_tokens,
        error={"message": j.error} if j.error else None,
    )  # fmt: skip


def _event_obj(e: EventRecord) -> EventObject:
    return EventObject(
        id=f"ftevent-{e.seq}", created_at=e.created_at, level=e.level, type=e.type, message=e.message,
        data=e.data,
    )  # fmt: skip


def _worker_health(w: WorkerRecord, now: float) -> dict[str, Any]:
    age = now - w.heartbeat_at
    return {
        "id": w.id, "host": w.host, "pid": w.pid, "base_model": w.base_model, "state": w.state,
        "active_jobs": w.active_jobs, "message": w.message, "time": w.heartbeat_at,
        "heartbeat_age_s": round(age, 3), "alive": age < _HEARTBEAT_STALE_S and w.state not in ("stopped", "error"),
        "max_concurrent_tasks": w.max_concurrent_tasks, "max_tokens_per_micro_batch": w.max_tokens_per_micro_batch,
    }  # fmt: skip


def _cursor(value: str | None, prefix: str) -> int | None:
    if value is None:
        return None
    digits = value.removeprefix(prefix)
    if not digits.isdigit() or len(digits) > 18:
        raise ApiError(
            400, f"after={value!r} is not a cursor: pass the id of the last object of a page", param="after"
        )
    return int(digits)


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


def _asset(name: str) -> bytes:
    return resources.files("lorafleet.service").joinpath("static", name).read_bytes()


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


_Tenant = Annotated[str, Depends(_tenant)]
_FileId = Annotated[str, PathParam(pattern=FILE_ID_PATTERN, description="file-<24 hex>")]
_JobId = Annotated[str, PathParam(pattern=JOB_ID_PATTERN, description="ftjob-<24 hex>")]
_AdapterId = Annotated[str, PathParam(pattern=ADAPTER_ID_PATTERN, description="adapter-[suffix-]<16 hex>")]
_Limit = Annotated[int, Query(ge=1, le=100, description="page size")]


def create_app(settings: ServiceSettings, store: Store | None = None) -> FastAPI:
    """The FastAPI application over ``settings.data_dir`` and the store at ``settings.store_url`` (unless
    ``store`` is given)."""
    dd = DataDir(Path(settings.data_dir)).create()
    if store is None:
        store = open_store(settings.store_url or default_store_url(dd.root))
    served_model = model_name(settings.base_model)

    app = FastAPI(
        title="lorafleet fine-tuning service",
        version="0.1.0",
        description=(
            "Fine-tune LoRA adapters on one shared base model. Every /v1 request needs "
            "`Authorization: Bearer TOKEN` (`lorafleet tokens create --tenant NAME`)."
        ),
    )
    app.state.store = store
    app.state.settings = settings
    app.add_middleware(_BodyLimit, upload_limit=settings.max_upload_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_json(exc.status, exc.message, exc.type, exc.param, exc.code, exc.errors)

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        # the database is down or restarting: a retryable 503, never a 500
        response = _error_json(
            503, f"the job store is unavailable; retry in {_RETRY_AFTER_S} s ({exc})", "service_unavailable",
            code="store_unavailable",
        )  # fmt: skip
        response.headers["Retry-After"] = str(_RETRY_AFTER_S)
        return response

    @app.exception_handler(QuotaExceeded)
    async def _over_quota(request: Request, exc: QuotaExceeded) -> JSONResponse:
        response = _error_json(429, str(exc), "rate_limit_error", param=exc.quota, code="quota_exceeded")
        response.headers["Retry-After"] = str(_QUOTA_RETRY_AFTER_S)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, msgs, param = _describe_validation(exc)
        return _error_json(422, message, "invalid_request_error", param, "validation_error", msgs)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}: see /docs for the API"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}: see /docs"
        return _error_json(exc.status_code, message, "invalid_request_error")

    def get_job(tenant_: str, job_id: str) -> JobRecord:
        job = store.get_job(tenant_, job_id)
        if job is None:
            raise _not_found("fine-tuning job", job_id)
        return job

    # -- health and dashboard ---------------------------------------------------------------------------

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> Health:
        """Liveness of the API and every worker's last heartbeat, newest first (no token needed); ``worker``
        is the newest one."""
        now = store.now()
        workers = [_worker_health(w, now) for w in store.list_workers()]
        first = workers[0] if workers else {"state": "not started", "alive": False}
        return Health(model=served_model, worker=first, workers=workers)

    @app.get("/", include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(_asset("dashboard.html"))

    @app.get("/dashboard.js", include_in_schema=False)
    def dashboard_js() -> Response:
        return Response(_asset("dashboard.js"), media_type="text/javascript")

    @app.get("/dashboard.css", include_in_schema=False)
    def dashboard_css() -> Response:
        return Response(_asset("dashboard.css"), media_type="text/css")

    # -- files ------------------------------------------------------------------------------------------

    upload_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary", "description": "JSONL data"},
                            "purpose": {"type": "string", "enum": ["fine-tune"], "default": "fine-tune"},
                        },
                    }
                }
            },
        }
    }

    @app.post(
        "/v1/files", response_model=FileObject, tags=["files"], responses=_ERRORS, openapi_extra=upload_body
    )
    async def upload_file(request: Request, tenant_: _Tenant) -> FileObject:
        """Upload a JSONL training file. Every row is validated; errors name the line."""
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(
                400, "send the file as multipart/form-data with a 'file' field (curl -F file=@data.jsonl)",
                param="file",
            )  # fmt: skip
        form = await request.form(max_files=1, max_fields=4)
        try:
            upload = form.get("file")
            purpose = form.get("purpose", "fine-tune")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "missing the 'file' part: upload with -F file=@data.jsonl", param="file")
            if purpose != "fine-tune":
                raise ApiError(400, f"purpose {purpose!r} is not supported: use 'fine-tune'", param="purpose")
            file_id = new_file_id()
            dest = dd.file_path(file_id)
            try:
                info = await run_in_threadpool(save_upload, upload.file, dest, settings.max_upload_bytes)
            except UploadError as e:
                raise ApiError(
                    413 if e.too_large else 400, str(e), param="file", code="invalid_file", errors=e.errors
                ) from None
            name = (upload.filename or "upload.jsonl")[:255]
            rec = FileRecord(
                id=file_id, tenant=tenant_, filename=name, purpose="fine-tune", bytes=info.bytes,
                num_rows=info.num_rows, format=info.format, created_at=time.time(),
            )  # fmt: skip
            try:
                await run_in_threadpool(store.add_file, rec)
            except BaseException:  # over quota or store down: the bytes are not kept either
                dest.unlink(missing_ok=True)
                raise
            return _file_obj(rec)
        finally:
            await form.close()

    @app.get("/v1/files", response_model=ListResponse[FileObject], tags=["files"], responses=_ERRORS)
    def list_files(
        tenant_: _Tenant,
        after: Annotated[str | None, Query(pattern=FILE_ID_PATTERN)] = None,
        limit: _Limit = 20,
    ) -> ListResponse[FileObject]:
        """The tenant's files, newest first."""
        rows, more = store.list_files(tenant_, after, limit)
        return ListResponse[FileObject](data=[_file_obj(f) for f in rows], has_more=more)

    @app.get("/v1/files/{file_id}", response_model=FileObject, tags=["files"], responses=_ERRORS)
    def get_file(file_id: _FileId, tenant_: _Tenant) -> FileObject:
        f = store.get_file(tenant_, file_id)
        if f is None:
            raise _not_found("file", file_id)
        return _file_obj(f)

    @app.delete("/v1/files/{file_id}", response_model=DeletedObject, tags=["files"], responses=_ERRORS)
    def delete_file(file_id: _FileId, tenant_: _Tenant) -> DeletedObject:
        """Delete a file; refused (409) while a job that is not finished uses it."""
        if store.get_file(tenant_, file_id) is None:
            raise _not_found("file", file_id)
        users = store.active_jobs_using_file(tenant_, file_id)
        if users:
            raise ApiError(
                409, f"file {file_id} is used by unfinished job(s) {', '.join(users)}: cancel them or wait",
                code="file_in_use",
            )  # fmt: skip
        if store.delete_file(tenant_, file_id):
            dd.file_path(file_id).unlink(missing_ok=True)
        return DeletedObject(id=file_id, object="file", deleted=True)

    # -- jobs -------------------------------------------------------------------------------------------

    @app.post("/v1/fine_tuning/jobs", response_model=JobObject, tags=["fine-tuning"], responses=_ERRORS)
    def create_job(body: JobCreate, tenant_: _Tenant) -> JobObject:
        """Create a job. It starts in ``validating_files``; the worker queues it and trains it."""
        if body.model is not None and body.model != served_model:
            # a fleet serves the base models its workers announce, besides this server's own
            fleet = sorted({served_model} | {w.base_model for w in store.list_workers()})
            if body.model not in fleet:
                raise ApiError(
                    400, f"model {body.model!r} is not served here: this fleet fine-tunes "
                    f"{', '.join(map(repr, fleet))} (omit 'model' for {served_model!r})", param="model",
                )  # fmt: skip
        for param in ("training_file", "validation_file"):
            fid = getattr(body, param)
            if fid is not None and store.get_file(tenant_, fid) is None:
                raise ApiError(
                    400, f"{param} {fid!r} does not exist: upload it with POST /v1/files and pass the id it "
                    "returns", param=param, code="file_not_found",
                )  # fmt: skip
        spec = body.model_dump(mode="json")
        spec["model"] = body.model or served_model
        job = JobRecord(
            id=new_job_id(), tenant=tenant_, status="validating_files", spec=spec,
            adapter_id=new_adapter_id(body.suffix), created_at=time.time(), priority=body.priority,
        )  # fmt: skip
        files = {}
        for fid in filter(None, (body.training_file, body.validation_file)):
            rec = store.get_file(tenant_, fid)
            files[fid] = (dd.file_path(fid), rec.format if rec else "")
        try:  # what the engine's config would refuse is refused now, not after the job was queued
            job_configs(spec, job.id, job.adapter_id, files, settings.engine, dd.engine)
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_job") from None
        store.add_job(job)
        store.add_events([EventRecord(job.id, "message", "Created fine-tuning job", time.time())])
        return _job_obj(job)

    @app.get(
        "/v1/fine_tuning/jobs",
        response_model=ListResponse[JobObject],
        tags=["fine-tuning"],
        responses=_ERRORS,
    )
    def list_jobs(
        tenant_: _Tenant,
        after: Annotated[str | None, Query(pattern=JOB_ID_PATTERN)] = None,
        limit: _Limit = 20,
    ) -> ListResponse[JobObject]:
        """The tenant's jobs, newest first; pass the last id as ``after`` for the next page."""
        rows, more = store.list_jobs(tenant_, after, limit)
        return ListResponse[JobObject](data=[_job_obj(j) for j in rows], has_more=more)

    @app.get(
        "/v1/fine_tuning/jobs/{job_id}", response_model=JobObject, tags=["fine-tuning"], responses=_ERRORS
    )
    def retrieve_job(job_id: _JobId, tenant_: _Tenant) -> JobObject:
        return _job_obj(get_job(tenant_, job_id))

    @app.post(
        "/v1/fine_tuning/jobs/{job_id}/cancel",
        response_model=JobObject,
        tags=["fine-tuning"],
        responses=_ERRORS,
    )
    def cancel_job(job_id: _JobId, tenant_: _Tenant) -> JobObject:
        """Cancel a job that has not finished; the worker stops training it at its next micro-batch."""
        job = get_job(tenant_, job_id)
        if not store.transition(job_id, "cancelled", ACTIVE_STATUSES, finished_at=time.time()):
            job = get_job(tenant_, job_id)
            raise ApiError(
                409, f"job {job_id} is already {job.status}; only jobs in {', '.join(ACTIVE_STATUSES)} can be "
                "cancelled", code="job_finished",
            )  # fmt: skip
        store.add_events([EventRecord(job.id, "message", "Job cancelled by the user", time.time())])
        return _job_obj(get_job(tenant_, job_id))

    @app.get(
        "/v1/fine_tuning/jobs/{job_id}/events", response_model=ListResponse[EventObject], tags=["fine-tuning"],
        responses=_ERRORS,
    )  # fmt: skip
    def list_events(
        job_id: _JobId,
        tenant_: _Tenant,
        after: Annotated[str | None, Query(pattern=r"^ftevent-[0-9]{1,18}$")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 20,
        order: Annotated[str, Query(pattern="^(asc|desc)$", description="desc: newest first")] = "desc",
    ) -> ListResponse[EventObject]:
        """Status messages and one ``metrics`` event per optimizer step (``data``: step, train_loss,
        learning_rate, tokens, elapsed_s). ``order=asc`` with ``after`` follows a running job."""
        get_job(tenant_, job_id)
        rows, more = store.list_events(job_id, _cursor(after, "ftevent-"), limit, ascending=order == "asc")
        return ListResponse[EventObject](data=[_event_obj(e) for e in rows], has_more=more)

    @app.get(
        "/v1/fine_tuning/jobs/{job_id}/checkpoints", response_model=ListResponse[CheckpointObject],
        tags=["fine-tuning"], responses=_ERRORS,
    )  # fmt: skip
    def list_checkpoints(
        job_id: _JobId,
        tenant_: _Tenant,
        after: Annotated[str | None, Query(pattern=r"^ftckpt-[0-9]{1,18}$")] = None,
        limit: _Limit = 20,
    ) -> ListResponse[CheckpointObject]:
        """The job's checkpoints, newest first."""
        get_job(tenant_, job_id)
        rows, more = store.list_checkpoints(job_id, _cursor(after, "ftckpt-"), limit)
        data = [
            CheckpointObject(
                id=f"ftckpt-{c.seq}",
                created_at=int(c.created_at),
                fine_tuning_job_id=job_id,
                step_number=c.step,
                metrics=c.metrics,
            )  # fmt: skip
            for c in rows
        ]
        return ListResponse[CheckpointObject](data=data, has_more=more)

    # -- adapters ---------------------------------------------------------------------------------------

    def adapter_job(tenant_: str, adapter_id: str) -> JobRecord:
        job = store.get_adapter_job(tenant_, adapter_id)
        if job is None:
            raise _not_found("adapter", adapter_id)
        if job.status != "succeeded":
            raise ApiError(
                409, f"adapter {adapter_id} is not ready: its job {job.id} is {job.status}",
                code="adapter_not_ready",
            )  # fmt: skip
        return job

    def adapter_obj(job: JobRecord) -> AdapterObject:
        a = job.spec["adapter"]
        return AdapterObject(
            id=job.adapter_id, created_at=int(job.finished_at or job.created_at), fine_tuning_job_id=job.id,
            base_model=job.spec["model"], type=a["type"], rank=a["rank"],
        )  # fmt: skip

    @app.get("/v1/adapters", response_model=ListResponse[AdapterObject], tags=["adapters"], responses=_ERRORS)
    def list_adapters(
        tenant_: _Tenant,
        after: Annotated[str | None, Query(pattern=JOB_ID_PATTERN, description="job id cursor")] = None,
        limit: _Limit = 20,
    ) -> ListResponse[AdapterObject]:
        """Adapters of the tenant's succeeded jobs, newest job first (``after`` is a job id cursor)."""
        rows, more = store.list_jobs(tenant_, after, limit, status="succeeded")
        return ListResponse[AdapterObject](data=[adapter_obj(j) for j in rows], has_more=more)

    @app.get("/v1/adapters/{adapter_id}", response_model=AdapterObject, tags=["adapters"], responses=_ERRORS)
    def get_adapter(adapter_id: _AdapterId, tenant_: _Tenant) -> AdapterObject:
        return adapter_obj(adapter_job(tenant_, adapter_id))

    @app.get(
        "/v1/adapters/{adapter_id}/download", tags=["adapters"],
        responses={**_ERRORS, 200: {"content": {"application/zip": {}}, "description": "the PEFT folder"}},
        response_class=FileResponse,
    )  # fmt: skip
    def download_adapter(adapter_id: _AdapterId, tenant_: _Tenant) -> FileResponse:
        """The adapter as a zip of its PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        adapter_job(tenant_, adapter_id)
        src = dd.adapter_dir(adapter_id)
        if not (src / "adapter_config.json").is_file():
            raise ApiError(
                409, f"adapter {adapter_id} has no files on the server (was DATA_DIR/engine cleaned?)",
                code="adapter_missing",
            )  # fmt: skip
        dest = dd.export_zip(adapter_id)
        if not dest.is_file():
            _zip_adapter(src, dest, adapter_id)
        return FileResponse(dest, media_type="application/zip", filename=f"{adapter_id}.zip")

    return app
