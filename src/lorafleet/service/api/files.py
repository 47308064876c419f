"""``/v1/files``: upload (every row validated), list, retrieve, delete."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from ..errors import ERROR_RESPONSES, ApiError, not_found
from ..files import FILE_ID_PATTERN, UploadError, new_file_id, save_upload
from ..schemas import DeletedObject, FileObject, ListResponse
from ..store import FileRecord
from .deps import FileId, Limit, ServiceDep, Tenant

__all__ = ["file_object", "router"]

router = APIRouter(prefix="/v1/files", tags=["files"], responses=ERROR_RESPONSES)


def file_object(f: FileRecord) -> FileObject:
    return FileObject(
        id=f.id, bytes=f.bytes, created_at=int(f.created_at), filename=f.filename, purpose=f.purpose,
        num_rows=f.num_rows, format=f.format,
    )  # fmt: skip


_UPLOAD_BODY = {
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


@router.post("", response_model=FileObject, openapi_extra=_UPLOAD_BODY)
async def upload_file(request: Request, tenant_: Tenant, svc: ServiceDep) -> FileObject:
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
        dest = svc.dd.file_path(file_id)
        try:
            info = await run_in_threadpool(save_upload, upload.file, dest, svc.settings.max_upload_bytes)
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
            await run_in_threadpool(svc.store.add_file, rec)
        except BaseException:  # over quota or store down: the bytes are not kept either
            dest.unlink(missing_ok=True)
            raise
        return file_object(rec)
    finally:
        await form.close()


@router.get("", response_model=ListResponse[FileObject])
def list_files(
    tenant_: Tenant,
    svc: ServiceDep,
    after: Annotated[str | None, Query(pattern=FILE_ID_PATTERN)] = None,
    limit: Limit = 20,
) -> ListResponse[FileObject]:
    """The tenant's files, newest first."""
    rows, more = svc.store.list_files(tenant_, after, limit)
    return ListResponse[FileObject](data=[file_object(f) for f in rows], has_more=more)


@router.get("/{file_id}", response_model=FileObject)
def get_file(file_id: FileId, tenant_: Tenant, svc: ServiceDep) -> FileObject:
    f = svc.store.get_file(tenant_, file_id)
    if f is None:
        raise not_found("file", file_id)
    return file_object(f)


@router.delete("/{file_id}", response_model=DeletedObject)
def delete_file(file_id: FileId, tenant_: Tenant, svc: ServiceDep) -> DeletedObject:
    """Delete a file; refused (409) while a job that is not finished uses it."""
    if svc.store.get_file(tenant_, file_id) is None:
        raise not_found("file", file_id)
    users = svc.store.active_jobs_using_file(tenant_, file_id)
    if users:
        raise ApiError(
            409, f"file {file_id} is used by unfinished job(s) {', '.join(users)}: cancel them or wait",
            code="file_in_use",
        )  # fmt: skip
    svc.dd.check_writable(svc.dd.files)  # a 503 before the record goes, not a file left behind after
    if svc.store.delete_file(tenant_, file_id):
        svc.dd.file_path(file_id).unlink(missing_ok=True)
    return DeletedObject(id=file_id, object="file", deleted=True)
