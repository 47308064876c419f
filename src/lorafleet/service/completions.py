"""Request bodies of ``/v1/chat/completions`` and ``/v1/completions`` (OpenAI's fields that lorafleet
implements) and their response objects. Unknown fields, and OpenAI fields lorafleet does not implement
(``n`` > 1, ``logprobs``, penalties, tools...), are a 400 that names them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from .jobrequest import StrictRequest

__all__ = [
    "ChatCompletionCreate",
    "ChatMessage",
    "CompletionCreate",
    "MAX_TOKENS_LIMIT",
    "StreamOptions",
    "Usage",
]

MAX_TOKENS_LIMIT = 4096  # the most new tokens one request may ask for


class ChatMessage(StrictRequest):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if isinstance(v, list) and any(p.get("type") != "text" or "text" not in p for p in v):
            raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        return v

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p["text"] for p in self.content)


class StreamOptions(StrictRequest):
    include_usage: bool = False


class _Sampling(StrictRequest):
    model: str = Field(max_length=600, description="the base model, a fine-tuned model or a checkpoint id")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0, le=2**63 - 1, description="sampling seed (the same seed: the same tokens)")
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the text ends before one")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = Field(1, description="one choice per request")
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and (len(v) > 4 or any(not s for s in v)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionCreate(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = Field(False, description="log p of each new token, with its text and bytes")
    top_logprobs: Literal[0] | None = Field(None, description="only 0: alternatives are not reported")

    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256


class CompletionCreate(_Sampling):
    prompt: str = Field(min_length=1, max_length=1 << 20)
    echo: bool = False

    def new_tokens(self) -> int:
        return self.max_tokens or 16


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
