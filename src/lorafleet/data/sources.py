"""Read dataset rows from .jsonl, .json, .csv and .parquet files; every row remembers where it came from.

    rows = read_rows("data/tech.jsonl")            # [Row(data={...}, file="data/tech.jsonl", line=1), ...]

Every problem raises ``DataError`` with ``file:line: what is wrong; the fix``. ``line`` is the 1-based line
where the row starts (.jsonl, .json, .csv) or the 1-based row number (.parquet). Blank lines in .jsonl are
skipped. A file without rows is an error: training on nothing is always a mistake.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .jsontext import MAX_DEPTH, JsonRowError, check_value, loads_row

__all__ = ["SUPPORTED_SUFFIXES", "DataError", "Row", "read_rows"]

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """A problem in a data file: ``file:line: what is wrong; the fix`` (``file: ...`` when no line applies).

    ``fix`` may be empty when ``what`` already says what to do.
    """

    def __init__(self, file: str, line: int | None, what: str, fix: str = ""):
        self.file, self.line, self.what, self.fix = file, line, what, fix
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {what}; {fix}" if fix else f"{where}: {what}")


@dataclass(frozen=True)
class Row:
    """One record of a data file: its fields and where it starts (``file:line``, used in error messages)."""

    data: dict[str, Any]
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def read_rows(path: str | Path, limit: int | None = None) -> list[Row]:
    """All rows of a data file, in file order (only the first ``limit`` rows when given).

    Formats by suffix: ``.jsonl`` one JSON object per line; ``.json`` one array of objects; ``.csv`` a header
    line then one record per row (all values are strings); ``.parquet`` needs ``pyarrow``.
    """
    p = Path(path)
    file = str(path)
    if not p.exists():
        raise DataError(
            file, None, "no such file", "check datasets[*].path (relative paths start at the config's folder)"
        )
    if p.is_dir():
        raise DataError(
            file, None, "is a folder, not a data file", f"give one file ({', '.join(SUPPORTED_SUFFIXES)})"
        )
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            file,
            None,
            f"unsupported file type {suffix or '(none)'!r}",
            f"use one of {', '.join(SUPPORTED_SUFFIXES)}",
        )
    if suffix == ".parquet":
        rows = _read_parquet(p, file, limit)
    else:
        try:
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            line = p.read_bytes()[: e.start].count(b"\n") + 1
            raise DataError(file, line, f"not UTF-8 text ({e.reason})", "save the file as UTF-8") from None
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}[suffix]
        rows = reader(text, file, limit)
    if not rows:
        raise DataError(
            file, None, "the dataset is empty (no rows)", "add at least one example or fix datasets[*].path"
        )
    return rows


def _read_jsonl(text: str, file: str, limit: int | None) -> list[Row]:
    rows: list[Row] = []
    # split on "\n" only: str.splitlines would also split inside JSON strings at U+2028 and friends.
    for number, line in enumerate(text.split("\n"), start=1):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        try:
            value = loads_row(line)
        except json.JSONDecodeError as e:
            raise DataError(
                file,
                number,
                f"not valid JSON ({e.msg} at column {e.colno})",
                "write one JSON object per line",
            ) from None
        except JsonRowError as e:
            raise DataError(file, number, str(e)) from None
        rows.append(Row(_as_object(value, file, number), file, number))
    return rows


def _read_json(text: str, file: str, limit: int | None) -> list[Row]:
    # Decode element by element so that each row knows the line it starts on.
    decoder = json.JSONDecoder()
    rows: list[Row] = []
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "[":
        raise DataError(
            file,
            _line_at(text, i),
            "a .json dataset must be one array of objects",
            'write [{"prompt": ...}, ...] or use .jsonl',
        )
    i = _skip_ws(text, i + 1)
    if i < len(text) and text[i] == "]":
        return rows
    while True:
        if limit is not None and len(rows) >= limit:
            return rows
        line = _line_at(text, i)
        try:
            value, i = decoder.raw_decode(text, i)
            check_value(value)
        except json.JSONDecodeError as e:
            raise DataError(
                file, e.lineno, f"not valid JSON ({e.msg} at column {e.colno})", "fix the JSON syntax there"
            ) from None
        except RecursionError:
            raise DataError(file, line, f"JSON nested too deeply (over {MAX_DEPTH} levels)") from None
        except JsonRowError as e:
            raise DataError(file, line, str(e)) from None
        rows.append(Row(_as_object(value, file, line), file, line))
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
            continue
        if i < len(text) and text[i] == "]":
            if _skip_ws(text, i + 1) != len(text):
                raise DataError(file, _line_at(text, i + 1), "text after the closing ']'", "remove it")
            return rows
        raise DataError(
            file, _line_at(text, i), "expected ',' or ']' after an array element", "fix the JSON syntax there"
        )


def _read_csv(text: str, file: str, limit: int | None) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as e:
        raise DataError(file, 1, f"not valid CSV ({e})", "fix the header line") from None
    names = [h.strip() for h in header]
    missing = [i + 1 for i, n in enumerate(names) if not n]
    if missing or len(set(names)) != len(names):
        raise DataError(
            file,
            1,
            f"the header line {header!r} has empty or repeated column names",
            "name every column once",
        )
    rows: list[Row] = []
    start = reader.line_num + 1
    while limit is None or len(rows) < limit:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(file, start, f"not valid CSV ({e})", "check the quoting of that record") from None
        if record and any(cell.strip() for cell in record):
            if len(record) != len(names):
                raise DataError(
                    file,
                    start,
                    f"{len(record)} values for {len(names)} columns ({', '.join(names)})",
                    "give one value per column, quoting values that contain commas",
                )
            rows.append(Row(dict(zip(names, record)), file, start))
        start = reader.line_num + 1
    return rows


def _read_parquet(p: Path, file: str, limit: int | None) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            file,
            None,
            "reading .parquet needs the pyarrow package, which is not installed",
            "pip install pyarrow, or convert the file to .jsonl",
        ) from None
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises its own hierarchy (ArrowInvalid, OSError...)
        raise DataError(file, None, f"not a readable parquet file ({e})", "check the file") from None
    if limit is not None:
        table = table.slice(0, limit)
    return [Row(dict(record), file, i + 1) for i, record in enumerate(table.to_pylist())]


def _as_object(value: Any, file: str, line: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(
            file,
            line,
            f"each row must be a JSON object, got {type(value).__name__}",
            'write {"field": value, ...}',
        )
    return value


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _line_at(text: str, i: int) -> int:
    return text.count("\n", 0, i) + 1
