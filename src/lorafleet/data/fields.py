"""Reading a row's fields: the checks and error messages every data format shares.

Each reader returns the field in the type the format needs or raises ``DataError`` naming ``file:line``, the
field, what was found and how to fix it.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any

from .sources import DataError, Row

__all__ = [
    "REQUIRED_FIELDS",
    "check_max_seq_len",
    "messages_field",
    "missing_field",
    "missing_hint",
    "report_unsupervised",
    "short_repr",
    "text_field",
]


def text_field(row: Row, name: str, required: bool = True) -> str:
    """Field ``name`` of ``row`` as a string (``""`` when absent and not required), else a ``DataError``."""
    value = row.data.get(name)
    if value is None:
        if not required:
            return ""
        raise missing_field(row, name)
    if not isinstance(value, str):
        raise DataError(
            row.file,
            row.line,
            f"field {name!r} is {type(value).__name__} {short_repr(value)}, expected a string",
            f"write {name} as a string",
        )
    return value


def messages_field(row: Row, name: str, only_assistant: bool = False) -> list[dict[str, str]]:
    """Field ``name`` as a non-empty list of ``{role, content}`` messages (assistant ones only if asked)."""
    value = row.data.get(name)
    if value is None:
        raise missing_field(row, name)
    example = '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
    if not isinstance(value, list) or not value:
        raise DataError(
            row.file,
            row.line,
            f"field {name!r} is {short_repr(value)}, expected a non-empty list of messages",
            f"write {example}",
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(
                row.file,
                row.line,
                f"{name}[{i}] is {short_repr(m)}, expected a message object",
                f"write {example}",
            )
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m else f"{type(m[key]).__name__} {short_repr(m[key])}"
                raise DataError(
                    row.file,
                    row.line,
                    f"{name}[{i}].{key} is {got}, expected a string",
                    f"give every message a string {key}",
                )
        if only_assistant and m["role"] != "assistant":
            raise DataError(
                row.file,
                row.line,
                f"{name}[{i}].role is {m['role']!r}, but an answer holds assistant messages only",
                "move other turns into the prompt",
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


REQUIRED_FIELDS = {
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
}


def missing_field(row: Row, name: str) -> DataError:
    """The error for a row without field ``name``: its location, the fields it has, what it needs."""
    present = ", ".join(repr(k) for k in row.data) or "none"
    return DataError(
        row.file, row.line, f"missing field {name!r} (fields present: {present})", missing_hint(row, name)
    )


def missing_hint(row: Row, name: str) -> str:
    """What a row of the format needing ``name`` must hold, with a near-miss key named if there is one."""
    for fmt, fields in REQUIRED_FIELDS.items():
        if name in fields:
            close = difflib.get_close_matches(name, [str(k) for k in row.data], n=1, cutoff=0.6)
            hint = f" (is {close[0]!r} meant to be {name!r}?)" if close else ""
            return f"a {fmt} row needs {', '.join(repr(f) for f in fields)}{hint}"
    return f"add {name!r}"


def report_unsupervised(empty: list[Row], total: int, kept: list[Any], max_seq_len: int) -> None:
    """Warn once about rows left without a supervised token (``empty``); raise if no row is ``kept``."""
    if not empty:
        return
    first = empty[0]
    if not kept:
        raise DataError(
            first.file,
            first.line,
            f"no row has a token left to learn from after cutting to max_seq_len = {max_seq_len}",
            "raise the task's max_seq_len or shorten the prompts",
        )
    warnings.warn(
        f"{first.file}: {len(empty)} of {total} rows have no supervised token after cutting to max_seq_len = "
        f"{max_seq_len} and are skipped (first at line {first.line}); raise max_seq_len or shorten their prompts",
        stacklevel=3,
    )


def check_max_seq_len(max_seq_len: int) -> None:
    """Refuse a ``max_seq_len`` below 2 (nothing could be learnt)."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len = {max_seq_len}; an example needs at least 2 tokens to learn anything")


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to 60 characters, for error messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
