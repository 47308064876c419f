"""Guards for JSON that comes from users: bounded nesting depth and valid Unicode.

``json.loads`` recurses once per nesting level (a row of 1000 nested arrays raises ``RecursionError``) and
accepts ``"\\ud800"``, a lone UTF-16 surrogate that no tokenizer can encode. Every reader of rows (training
data files, the service's uploads) parses with ``loads_row`` / checks with ``check_value``, so both problems
are a ``JsonRowError`` (a ``ValueError``) that the caller reports with the file and line.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_DEPTH", "JsonRowError", "check_value", "loads_row"]

MAX_DEPTH = 64  # far deeper than any data format here (chat rows are 3 levels)


class JsonRowError(ValueError):
    """A parsed JSON value that is too deeply nested or holds invalid Unicode; the message says the fix."""


_TOO_DEEP = f"JSON nested deeper than {MAX_DEPTH} levels; rows of the data formats are a few levels deep"


def _bad_text(s: str) -> str | None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"invalid Unicode: a lone surrogate ({s[e.start]!r}) at character {e.start} of {s[:40]!r}; "
            "\\ud800-\\udfff escapes must come in valid pairs (save the text as UTF-8)"
        )
    return None


def check_value(value: Any) -> None:
    """Raise ``JsonRowError`` when ``value`` nests deeper than ``MAX_DEPTH`` or a string (or key) is not
    valid Unicode. Iterative, so any depth is safe to check."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            err = _bad_text(v)
            if err:
                raise JsonRowError(err)
        elif isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                raise JsonRowError(_TOO_DEEP)
            if isinstance(v, dict):
                stack.extend((k, depth) for k in v)
                stack.extend((x, depth + 1) for x in v.values())
            else:
                stack.extend((x, depth + 1) for x in v)


def loads_row(text: str) -> Any:
    """``json.loads(text)`` checked with ``check_value``; ``json.JSONDecodeError`` for bad syntax as usual,
    ``JsonRowError`` for too deep (also when the parser itself would run out of stack) or invalid Unicode."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise JsonRowError(_TOO_DEEP) from None
    check_value(value)
    return value
