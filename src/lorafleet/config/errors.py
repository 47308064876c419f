"""Config errors: one paragraph per problem, each with where (file:line, field path), the bad value and the fix.

``ConfigError`` is what users see. Validators raise ``Problems`` (field paths relative to the model being
validated); ``explain`` turns one pydantic error into ``(field path, message)`` pairs, looking field types up
in the root model it is given.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel

__all__ = ["ConfigError", "Loc", "Problems", "explain", "fmt_loc", "short", "unknown_name"]

Loc = tuple[str | int, ...]


class ConfigError(ValueError):
    """A configuration mistake; the message has one paragraph per problem, each with where, what and the fix.

    ``problems`` holds the same paragraphs as a list.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n\n".join(self.problems))


class Problems(ValueError):
    """Raised inside validators: ``(location relative to the model, message)`` pairs, unpacked later."""

    def __init__(self, items: list[tuple[Loc, str]]):
        self.items = items
        super().__init__("; ".join(f"{fmt_loc(loc)}: {msg}" if loc else msg for loc, msg in items))


_KIND = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string (quote it in YAML)",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping of fields",
    "model_type": "a mapping of fields",
    "model_attributes_type": "a mapping of fields",
}

# pydantic error type -> (symbol, ctx key of the bound)
_BOUND = {
    "greater_than": (">", "gt"),
    "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}


def explain(err: dict, root: type[BaseModel]) -> list[tuple[Loc, str]]:
    """Turn one pydantic error into ``(field path, message with the value and the fix)`` pairs."""
    loc: Loc = tuple(err["loc"])
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "value_error":
        exc = ctx.get("error")
        if isinstance(exc, Problems):
            return [(loc + rel, msg) for rel, msg in exc.items]
        return [(loc, str(exc) if exc is not None else err["msg"])]
    if kind == "extra_forbidden":
        moved = _MOVED.get(tuple(p for p in loc if not isinstance(p, int)))
        if moved is not None:
            return [(loc, moved)]
        known = list(_model_at(root, loc[:-1]).model_fields) if _model_at(root, loc[:-1]) else []
        key = str(loc[-1])
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return [(loc, f"unknown field {key!r}; {hint}known fields here: {', '.join(known)}")]
    if kind == "missing" and loc and isinstance(loc[-1], int):
        # A fixed-length list (betas) with too few values.
        n = len(typing.get_args(_annotation_at(root, loc[:-1])))
        return [(loc[:-1], f"got {short(value)}; give exactly {n} values")]
    if kind == "missing":
        model = _model_at(root, loc[:-1])
        desc = model.model_fields[loc[-1]].description if model and loc[-1] in model.model_fields else None
        about = f" ({desc})" if desc else ""
        return [(loc, f"required field is missing; add {loc[-1]}: ...{about}")]
    if kind == "literal_error":
        options = _literal_options(root, loc)
        close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.5) if options else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        choices = ", ".join(options) if options else ctx.get("expected", "")
        return [(loc, f"got {short(value)}; use one of {choices}{hint}")]
    if kind in _BOUND:
        symbol, key = _BOUND[kind]
        return [(loc, f"got {short(value)}; it must be {symbol} {ctx.get(key)}")]
    if kind in _KIND:
        return [(loc, f"got {short(value)} ({type(value).__name__}); use {_KIND[kind]}")]
    return [(loc, f"got {short(value)}; {err['msg']}")]


# fields that moved, with where they went
_MOVED: dict[Loc, str] = {
    ("pipeline", "recompute"): "moved to the top level: write `recompute: true` (not under pipeline:); it "
    "applies to single-process runs and to every pipeline stage",
}


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fmt_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def unknown_name(name: str, kind: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    names = ", ".join(repr(k) for k in sorted(known)) or "none"
    return f"no {kind} named {name!r}; {hint}{kind}s defined: {names}"


def _annotation_at(root: type[BaseModel], loc: Loc) -> Any:
    """The type annotation of the field at ``loc`` in ``root`` (list indices step into items)."""
    ann: Any = root
    for part in loc:
        ann = _unwrap(ann)
        if isinstance(part, int):
            args = typing.get_args(ann)
            if typing.get_origin(ann) is list and args:
                ann = args[0]
            elif typing.get_origin(ann) is tuple and args:
                ann = args[min(part, len(args) - 1)]
            else:
                return None
        elif isinstance(ann, type) and issubclass(ann, BaseModel) and part in ann.model_fields:
            ann = ann.model_fields[part].annotation
        else:
            return None
    return _unwrap(ann)


def _unwrap(ann: Any) -> Any:
    """Strip ``X | None`` and ``Annotated[X, ...]`` down to X."""
    while True:
        origin = typing.get_origin(ann)
        if origin is Annotated:
            ann = typing.get_args(ann)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(args) != 1:
                return ann
            ann = args[0]
        else:
            return ann


def _model_at(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    ann = _annotation_at(root, loc)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _literal_options(root: type[BaseModel], loc: Loc) -> list[str]:
    ann = _annotation_at(root, loc)
    return [str(a) for a in typing.get_args(ann)] if typing.get_origin(ann) is Literal else []
