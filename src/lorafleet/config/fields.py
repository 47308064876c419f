"""Field types shared by the config's sections: whole numbers and floats that refuse booleans, names that
become file names, and ``Section`` (unknown fields are errors)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

__all__ = ["Float", "Int", "Name", "Section", "distinct"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_NAME_RULE = (
    "names become file and folder names: use 1 to 100 letters, digits, '-', '_' or '.', starting with a "
    "letter or digit"
)


def _no_bool(value: Any) -> Any:
    # pydantic's lax mode reads true as 1; in a config that is always a mistake.
    if isinstance(value, bool):
        raise ValueError(f"got {str(value).lower()} (a boolean); use a number")
    return value


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(f"got {value!r}; {_NAME_RULE}")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]
Name = Annotated[str, AfterValidator(_check_name)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def distinct(values: list) -> list:
    """Validator: the list names each value once."""
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"got {values}: {', '.join(map(repr, dupes))} listed twice; list each value once")
    return values
