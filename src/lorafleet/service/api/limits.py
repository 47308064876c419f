"""ASGI middleware that bounds request bodies (uploads by ``--max-upload-mb``, JSON requests by 1 MiB)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from ..errors import error_response

__all__ = ["JSON_BODY_LIMIT", "BodyLimit"]

JSON_BODY_LIMIT = 1 << 20  # requests other than uploads are small JSON documents


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: answers 413 for bodies over the limit, before reading them when Content-Length
    says so, else as soon as the streamed bytes pass it (so an oversize upload is never stored whole)."""

    def __init__(self, app, upload_limit: int) -> None:
        self.app = app
        self.upload_limit = upload_limit

    def _response(self, limit: int) -> JSONResponse:
        return error_response(
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
        limit = self.upload_limit + 65536 if is_upload else JSON_BODY_LIMIT
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
