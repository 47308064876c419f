"""Every error of the REST API, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Requests that fail validation (a missing or unknown field, a value out of range) are a 400 naming the
field, as at OpenAI. The status decides which exception the official ``openai`` SDK raises (400 ``BadRequestError``, 401
``AuthenticationError``, 403 ``PermissionDeniedError``, 404 ``NotFoundError``, 409 ``ConflictError``, 422
``UnprocessableEntityError``, 429 ``RateLimitError``: over one of the tenant's quotas, with ``Retry-After``);
503 means a dependency is down: the job store (``StoreUnavailable``, with ``Retry-After``), the data folder's
storage (with ``Retry-After`` when it cannot be written) or the inference worker. The
handlers here turn FastAPI's own errors (validation, unknown routes) into the same shape, so no request is
ever answered with a bare ``{"detail": ...}``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .files import StorageUnavailable
from .schemas import ErrorResponse
from .store import QuotaExceeded, StoreUnavailable

__all__ = [
    "ERROR_RESPONSES",
    "STORAGE_RETRY_AFTER_S",
    "ApiError",
    "error_response",
    "install_error_handlers",
    "not_found",
]

STORAGE_RETRY_AFTER_S = 30  # what a 503 for unwritable storage tells clients to wait

_log = logging.getLogger("lorafleet.service")
_RETRY_AFTER_S = 5  # what a 503 asks the client to wait while the store is unreachable
_QUOTA_RETRY_AFTER_S = 30  # what a 429 asks: jobs finish, files get deleted


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


def error_response(
    status: int, message: str, type: str, param=None, code=None, errors=None, headers=None
) -> JSONResponse:
    """The JSON response of one error (with ``WWW-Authenticate`` on a 401, and any extra ``headers``)."""
    body: dict[str, Any] = {"message": message, "type": type, "param": param, "code": code}
    if errors:
        body["errors"] = errors
    headers = dict(headers or {}) | ({"WWW-Authenticate": "Bearer"} if status == 401 else {})
    return JSONResponse({"error": body}, status_code=status, headers=headers or None)


def _storage_unavailable(exc: StorageUnavailable) -> JSONResponse:
    _log.warning("answering 503: storage cannot be written: %s", exc.cause)  # the full error, with its path
    return error_response(
        503, str(exc), "server_error", code="storage_unavailable",
        headers={"Retry-After": str(STORAGE_RETRY_AFTER_S)},
    )  # fmt: skip


def not_found(kind: str, id_: str) -> ApiError:
    """The 404 for a missing object, and for another tenant's object (the same answer, so ids leak nothing)."""
    return ApiError(404, f"no {kind} with id {id_!r}", type="not_found_error", code="not_found")


# the error statuses every route documents in the OpenAPI schema
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse, "description": d}
    for s, d in {
        400: "invalid request",
        401: "missing or invalid API token",
        404: "not found (or owned by another tenant)",
        409: "conflict with the object's state",
        403: "not allowed (deleting the base model)",
        413: "request too large",
        429: "over one of the tenant's quotas (the message names it; retry after Retry-After)",
        503: "the job store is unavailable or storage cannot be written (retry after the Retry-After header's "
        "seconds), or the inference worker is not running",
    }.items()
}


def _describe_validation(exc: RequestValidationError) -> tuple[str, list[str], str | None]:
    msgs = []
    param = None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"] or ["body"]
        where = ".".join(loc)
        param = param or where
        kind = err.get("type", "")
        if kind == "value_error" and str(err.get("msg", "")).startswith("Value error, "):
            msg = err["msg"].removeprefix("Value error, ")
            msgs.append(msg if where == "body" else f"{where}: {msg}")
        elif kind == "extra_forbidden":
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


def install_error_handlers(app: FastAPI) -> None:
    """Answer ``ApiError``, the store's ``StoreUnavailable`` (503) and ``QuotaExceeded`` (429), storage
    faults (``StorageUnavailable`` and any other ``OSError``: 503), request validation errors and Starlette's
    HTTP errors in the one shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.errors)

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        # the database is down or restarting: a retryable 503, never a 500
        response = error_response(
            503, f"the job store is unavailable; retry in {_RETRY_AFTER_S} s ({exc})", "service_unavailable",
            code="store_unavailable",
        )  # fmt: skip
        response.headers["Retry-After"] = str(_RETRY_AFTER_S)
        return response

    @app.exception_handler(QuotaExceeded)
    async def _over_quota(request: Request, exc: QuotaExceeded) -> JSONResponse:
        response = error_response(429, str(exc), "rate_limit_error", param=exc.quota, code="quota_exceeded")
        response.headers["Retry-After"] = str(_QUOTA_RETRY_AFTER_S)
        return response

    @app.exception_handler(StorageUnavailable)
    async def _storage_error(request: Request, exc: StorageUnavailable) -> JSONResponse:
        return _storage_unavailable(exc)

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        # a file operation of the data folder failed (read-only, full, gone), or the connection to the
        # inference worker broke: retryable, never a 500
        _log.error("%s %s: %s", request.method, request.url.path, exc, exc_info=exc)
        if isinstance(exc, ConnectionError):
            return error_response(
                503, "the connection to the inference worker broke; retry", "server_error",
                code="worker_unavailable", headers={"Retry-After": str(_RETRY_AFTER_S)},
            )  # fmt: skip
        return _storage_unavailable(StorageUnavailable(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, msgs, param = _describe_validation(exc)
        return error_response(400, message, "invalid_request_error", param, "invalid_value", msgs)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}: see /docs for the API"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}: see /docs"
        return error_response(exc.status_code, message, "invalid_request_error")
