"""``/v1/chat/completions`` and ``/v1/completions``: inference with the base, a fine-tuned model or a
checkpoint, answered by the worker that holds the base model (``lorafleet.service.inference``).

This process resolves the model for the tenant (another tenant's model is a 404), forwards the request
over the worker's Unix socket and turns the worker's JSON lines into OpenAI's objects: a
``chat.completion`` / ``text_completion`` with ``usage``, or with ``stream: true`` server-sent events of
``chat.completion.chunk`` / ``text_completion`` chunks ending in ``data: [DONE]``. A worker that is not
running (or dies mid-request) is a 503.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from ..completions import ChatCompletionCreate, CompletionCreate
from ..errors import ERROR_RESPONSES, ApiError
from .deps import Service, ServiceDep, Tenant
from .models import resolve_model

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["inference"], responses=ERROR_RESPONSES)

_LINE_LIMIT = 1 << 22


def _unavailable(why: str) -> ApiError:
    return ApiError(
        503, f"the inference worker is not available ({why}); it starts with `lorafleet serve`, retry shortly",
        type="service_unavailable", code="worker_unavailable",
    )  # fmt: skip


class _WorkerCall:
    """One request to the worker: send it, then read its JSON lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, svc: Service, request: dict[str, Any]) -> tuple[_WorkerCall, dict[str, Any]]:
        try:
            reader, writer = await asyncio.open_unix_connection(
                str(svc.dd.inference_socket), limit=_LINE_LIMIT
            )
        except (OSError, ValueError) as e:
            raise _unavailable(type(e).__name__) from None
        call = cls(reader, writer)
        writer.write((json.dumps(request) + "\n").encode())
        await writer.drain()
        first = await call.next()
        if first["type"] == "error":
            call.close()
            raise ApiError(first.get("status", 400), first["message"], param=first.get("param"))
        return call, first

    async def next(self) -> dict[str, Any]:
        line = await self.reader.readline()
        if not line:
            raise _unavailable("it stopped during the request")
        return json.loads(line)

    def close(self) -> None:
        self.writer.close()


async def _worker_request(svc: Service, tenant: str, body, kind: str) -> dict[str, Any]:
    m = await run_in_threadpool(resolve_model, svc, tenant, body.model)
    trained_on = (m.job.spec.get("model") if m.job is not None else None) or svc.served_model
    if trained_on != svc.served_model:  # a fleet's other base model: this server's worker does not hold it
        raise ApiError(
            400, f"{m.id!r} was fine-tuned on {trained_on!r}; this server runs inference on "
            f"{svc.served_model!r} only: ask a server whose base model is {trained_on!r}", param="model",
            code="model_not_served",
        )  # fmt: skip
    req: dict[str, Any] = {
        "kind": kind, "model": m.id, "adapter_path": None if m.adapter_dir is None else str(m.adapter_dir),
        "max_tokens": body.new_tokens(), "temperature": body.temperature, "top_p": body.top_p,
        "seed": body.seed, "stop": body.stop_list(),
    }  # fmt: skip
    if m.job is not None and m.id != m.job.adapter_id:  # a checkpoint: no adapter_config.json of its own
        req["adapter_settings"] = m.job.spec["lorafleet"]["adapter"]
    if kind == "chat":
        req["logprobs"] = body.logprobs
        req["messages"] = [{"role": msg.role, "content": msg.text()} for msg in body.messages]
    else:
        req["prompt"] = body.prompt
    return req


def _usage(done: dict[str, Any]) -> dict[str, int]:
    p, c = done["prompt_tokens"], done["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _collect(call: _WorkerCall) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    parts, tokens = [], []
    try:
        while True:
            msg = await call.next()
            if msg["type"] == "delta":
                parts.append(msg["text"])
            elif msg["type"] == "token":
                tokens.append({k: v for k, v in msg.items() if k != "type"})
            elif msg["type"] == "done":
                return "".join(parts), msg, tokens
    finally:
        call.close()


def _sse(obj: dict[str, Any] | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


async def _stream(call: _WorkerCall, chunk, usage_chunk) -> AsyncIterator[bytes]:
    """SSE: ``chunk(text, finish_reason)`` per delta and at the end, ``usage_chunk(done)`` if wanted."""
    try:
        first = chunk(None, None)
        if first is not None:
            yield _sse(first)
        while True:
            try:
                msg = await call.next()
            except ApiError:
                return  # the worker went away: the stream ends without [DONE], as a broken stream does
            if msg["type"] == "delta":
                yield _sse(chunk(msg["text"], None))
            elif msg["type"] == "token":
                yield _sse(chunk("", None, {k: v for k, v in msg.items() if k != "type"}))
            elif msg["type"] == "done":
                yield _sse(chunk("", msg["finish_reason"]))
                extra = usage_chunk(msg)
                if extra is not None:
                    yield _sse(extra)
                yield _sse("[DONE]")
                return
    finally:
        call.close()


@router.post("/chat/completions")
async def create_chat_completion(body: ChatCompletionCreate, tenant_: Tenant, svc: ServiceDep):
    """A chat completion from the base model, a fine-tuned model or a checkpoint (``model``)."""
    call, _ = await _WorkerCall.open(svc, await _worker_request(svc, tenant_, body, "chat"))
    cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
    head = {"id": cid, "created": created, "model": body.model, "system_fingerprint": None}
    if not body.stream:
        text, done, tokens = await _collect(call)
        choice = {
            "index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
            "finish_reason": done["finish_reason"],
            "logprobs": {"content": tokens, "refusal": None} if body.logprobs else None,
        }  # fmt: skip
        return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(done)}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(text: str | None, finish: str | None, token: dict | None = None) -> dict[str, Any]:
        delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
        lp = {"content": [token], "refusal": None} if token is not None else None
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": lp}
        return {**head, "object": "chat.completion.chunk", "choices": [choice]}

    def usage_chunk(done: dict[str, Any]) -> dict[str, Any] | None:
        if not include_usage:
            return None
        return {**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(done)}

    return StreamingResponse(_stream(call, chunk, usage_chunk), media_type="text/event-stream")


@router.post("/completions")
async def create_completion(body: CompletionCreate, tenant_: Tenant, svc: ServiceDep):
    """A text completion of ``prompt`` (no chat template) from the base, a fine-tuned model or a checkpoint."""
    call, _ = await _WorkerCall.open(svc, await _worker_request(svc, tenant_, body, "completion"))
    cid, created = "cmpl-" + secrets.token_hex(12), int(time.time())
    head = {"id": cid, "object": "text_completion", "created": created, "model": body.model}
    prefix = body.prompt if body.echo else ""
    if not body.stream:
        text, done, _ = await _collect(call)
        choice = {"index": 0, "text": prefix + text, "finish_reason": done["finish_reason"], "logprobs": None}
        return {**head, "choices": [choice], "usage": _usage(done)}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(text: str | None, finish: str | None, token: dict | None = None) -> dict[str, Any] | None:
        if text is None:
            text = prefix
            if not text:
                return None
        return {**head, "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    def usage_chunk(done: dict[str, Any]) -> dict[str, Any] | None:
        return {**head, "choices": [], "usage": _usage(done)} if include_usage else None

    return StreamingResponse(_stream(call, chunk, usage_chunk), media_type="text/event-stream")
