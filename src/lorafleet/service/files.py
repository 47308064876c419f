"""Uploaded training files and every path the service builds from an id.

Ids are made by the service (``file-``/``ftjob-``/``adapter-`` and random hex) and every id that arrives
in a request is matched against its pattern before it is looked up, so no name a client chose ever becomes
part of a path; ``safe_child`` checks the pattern again and that the result stays inside its folder.

An upload is validated row by row while it is copied to ``DATA_DIR/files/``: UTF-8, one JSON object per
line (nested at most ``data.jsontext.MAX_DEPTH`` levels, valid Unicode: no lone surrogates), every row in
one of the known data formats. Errors name the line (1-based) and the fix.

Data directory layout::

    DATA_DIR/lorafleet.db             the store (SQLite)
    DATA_DIR/files/<file id>.jsonl    uploads
    DATA_DIR/engine/                  the engine's OUTPUT_DIR: checkpoints/<job id>/, adapters/<adapter id>/
                                      (``check_writable`` probes these two before a job is created or started)
    DATA_DIR/exports/<adapter id>.zip adapter downloads, built once
    DATA_DIR/worker.lock              held by the one running worker
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..data.jsontext import loads_row

__all__ = [
    "ADAPTER_ID_PATTERN",
    "FILE_ID_PATTERN",
    "JOB_ID_PATTERN",
    "SUFFIX_PATTERN",
    "DataDir",
    "StorageUnavailable",
    "UploadError",
    "ValidatedUpload",
    "new_adapter_id",
    "new_file_id",
    "new_job_id",
    "safe_child",
    "save_upload",
    "validate_row",
]

FILE_ID_PATTERN = r"^file-[0-9a-f]{24}$"
JOB_ID_PATTERN = r"^ftjob-[0-9a-f]{24}$"
# the optional part is the job's ``suffix`` (lower-case letters, digits and '-')
ADAPTER_ID_PATTERN = r"^adapter-(?:[a-z0-9][a-z0-9-]{0,39}-)?[0-9a-f]{16}$"
SUFFIX_PATTERN = r"^[a-z0-9][a-z0-9-]{0,39}$"

_MAX_ERRORS = 10  # reported per upload; the count of the rest is given


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def new_job_id() -> str:
    return "ftjob-" + secrets.token_hex(12)


def new_adapter_id(suffix: str | None) -> str:
    if suffix is not None and not re.match(SUFFIX_PATTERN, suffix):
        raise ValueError(f"suffix {suffix!r} must match {SUFFIX_PATTERN}")
    return "adapter-" + (f"{suffix}-" if suffix else "") + secrets.token_hex(8)


def safe_child(root: Path, name: str, pattern: str, ext: str = "") -> Path:
    """``root / (name + ext)``, after checking that ``name`` matches ``pattern`` and the path stays in
    ``root``. An id that fails here was never made by the service, so this raises ValueError."""
    if not re.match(pattern, name) or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"{name!r} is not a valid id (expected {pattern})")
    path = (root / (name + ext)).resolve()
    if path.parent != root.resolve():
        raise ValueError(f"{name!r} leaves its folder")
    return path


@dataclass(frozen=True)
class DataDir:
    """The service's folders under one root (see the module docstring)."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "lorafleet.db"

    @property
    def files(self) -> Path:
        return self.root / "files"

    @property
    def engine(self) -> Path:
        return self.root / "engine"

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    @property
    def lock(self) -> Path:
        return self.root / "worker.lock"

    @property
    def inference_socket(self) -> Path:
        """The worker's inference socket (a short path under /tmp when the data folder's is too long for
        a Unix socket address)."""
        path = self.root / "inference.sock"
        if len(str(path.resolve())) <= 100:
            return path
        import hashlib

        digest = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]
        return Path("/tmp") / f"lorafleet-{digest}.sock"

    def create(self) -> DataDir:
        for p in (self.root, self.files, self.engine, self.exports, *self.job_folders):
            p.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def job_folders(self) -> tuple[Path, Path]:
        """The folders a training job writes into: its checkpoints and its finished adapter."""
        return self.engine / "checkpoints", self.engine / "adapters"

    def check_writable(self, *folders: Path) -> None:
        """Raise ``StorageUnavailable`` unless a file can be created, written, synced and removed in each of
        ``folders`` (default ``job_folders``: what a job about to be created or started needs), as a
        read-only or full disk, or a folder gone or replaced, would not let it. The exception's ``cause`` is
        the full error (with its path, for the log)."""
        for folder in folders or self.job_folders:
            probe = folder / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, b"x")
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.unlink(probe)
            except OSError as e:
                raise StorageUnavailable(e) from e

    def file_path(self, file_id: str) -> Path:
        return safe_child(self.files, file_id, FILE_ID_PATTERN, ".jsonl")

    def adapter_dir(self, adapter_id: str) -> Path:
        return safe_child(self.engine / "adapters", adapter_id, ADAPTER_ID_PATTERN)

    def checkpoint_dir(self, job_id: str) -> Path:
        return safe_child(self.engine / "checkpoints", job_id, JOB_ID_PATTERN)

    def export_zip(self, adapter_id: str) -> Path:
        return safe_child(self.exports, adapter_id, ADAPTER_ID_PATTERN, ".zip")


class StorageUnavailable(Exception):
    """The data folder cannot be written right now (read-only, full, an I/O error): the request is fine and
    may be retried later. The message is for tenants: it never contains a server path."""

    def __init__(self, cause: OSError) -> None:
        why = os.strerror(cause.errno) if cause.errno else type(cause).__name__
        super().__init__(f"the server's storage cannot be written right now ({why}); retry later")
        self.cause = cause


class UploadError(ValueError):
    """A rejected upload. ``errors`` lists one message per bad line (at most ``_MAX_ERRORS``);
    ``too_large`` says the data passed the size limit."""

    def __init__(self, message: str, errors: list[str] | None = None, too_large: bool = False) -> None:
        super().__init__(message)
        self.errors = errors or []
        self.too_large = too_large


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {'role': ..., 'content': ...} objects"
    roles = {"system", "user", "assistant"}
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not _is_str(m.get("content")) or m.get("role") not in roles:
            return f"messages[{i}] must be an object with 'role' in {sorted(roles)} and a string 'content'"
    if not any(m["role"] == "assistant" for m in messages):
        return "'messages' has no 'assistant' message: there is nothing to learn from this row"
    return None


_FORMATS_HELP = (
    "each line must be one JSON object in one of the formats: chat {'messages': [{'role', 'content'}...]}, "
    "prompt/completion {'prompt', 'completion'}, alpaca {'instruction', 'input'?, 'output'}, "
    "preference {'prompt', 'chosen', 'rejected'}, unpaired_preference {'prompt', 'completion', 'label'}, "
    "text {'text'}"
)


def validate_row(row: Any) -> str:
    """The data format of one parsed JSONL row; raises ValueError saying what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}; {_FORMATS_HELP}")
    if "messages" in row:
        err = _check_messages(row["messages"])
        if err:
            raise ValueError(err)
        return "chat"
    if "chosen" in row or "rejected" in row:
        for k in ("prompt", "chosen", "rejected"):
            if not _is_str(row.get(k)):
                raise ValueError(
                    f"preference rows need string fields 'prompt', 'chosen' and 'rejected' ({k!r})"
                )
        return "preference"
    if "label" in row:  # KTO's unpaired rows
        if (
            not _is_str(row.get("prompt"))
            or not _is_str(row.get("completion"))
            or not isinstance(row["label"], bool)
        ):
            raise ValueError(
                "unpaired_preference rows need string fields 'prompt' and 'completion' and a boolean 'label'"
            )
        return "unpaired_preference"
    if "instruction" in row:
        if not _is_str(row.get("instruction")) or not _is_str(row.get("output")):
            raise ValueError(
                "alpaca rows need string fields 'instruction' and 'output' ('input' is optional)"
            )
        if "input" in row and not _is_str(row["input"]):
            raise ValueError("alpaca field 'input' must be a string")
        return "alpaca"
    if "prompt" in row or "completion" in row:
        if not _is_str(row.get("prompt")) or not _is_str(row.get("completion")):
            raise ValueError("prompt/completion rows need string fields 'prompt' and 'completion'")
        return "prompt_completion"
    if "text" in row:
        if not _is_str(row["text"]):
            raise ValueError("'text' must be a string")
        return "text"
    raise ValueError(f"no known fields (got {sorted(row)[:8]}); {_FORMATS_HELP}")


@dataclass(frozen=True)
class ValidatedUpload:
    bytes: int
    num_rows: int
    format: str


def _lines(src: IO[bytes], chunk: int = 1 << 16) -> Iterable[bytes]:
    """The lines of ``src`` without their newlines; a line longer than a chunk is joined once, not rescanned
    per chunk."""
    pieces: list[bytes] = []  # the current line so far
    while data := src.read(chunk):
        *complete, rest = data.split(b"\n")
        for part in complete:
            pieces.append(part)
            yield b"".join(pieces)
            pieces = []
        if rest:
            pieces.append(rest)
    if pieces:
        yield b"".join(pieces)


def save_upload(src: IO[bytes], dest: Path, max_bytes: int) -> ValidatedUpload:
    """Validate ``src`` as JSONL and copy it to ``dest`` (atomically: a partial file never appears).

    Raises UploadError listing the bad lines, or when the data exceeds ``max_bytes`` or has no rows;
    ``StorageUnavailable`` when the data folder cannot be written (nothing is kept then)."""
    try:
        return _save_upload(src, dest, max_bytes)
    except OSError as e:
        raise StorageUnavailable(e) from e


def _save_upload(src: IO[bytes], dest: Path, max_bytes: int) -> ValidatedUpload:
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    errors: list[str] = []
    num_bad = 0
    num_rows = 0
    total = 0
    formats: dict[str, int] = {}  # format -> first line that used it
    try:
        with open(tmp, "wb") as out:
            for lineno, raw in enumerate(_lines(src), start=1):
                total += len(raw) + 1
                if total > max_bytes + 1:  # +1: the last line may lack its newline
                    raise UploadError(
                        f"file is larger than the upload limit of {max_bytes} bytes: split it, or start the "
                        "server with a larger --max-upload-mb",
                        too_large=True,
                    )
                out.write(raw + b"\n")
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    err = f"line {lineno}: not UTF-8 text (byte {e.start}); save the file as UTF-8"
                else:
                    if not text.strip():
                        continue
                    err = None
                    try:
                        fmt = validate_row(loads_row(text))
                    except json.JSONDecodeError as e:
                        err = f"line {lineno}: invalid JSON: {e.msg} (column {e.colno})"
                    except ValueError as e:
                        err = f"line {lineno}: {e}"
                    else:
                        num_rows += 1
                        formats.setdefault(fmt, lineno)
                if err is not None:
                    num_bad += 1
                    if len(errors) < _MAX_ERRORS:
                        errors.append(err)
            out.flush()
            os.fsync(out.fileno())
        if num_bad:
            more = f" (and {num_bad - len(errors)} more)" if num_bad > len(errors) else ""
            raise UploadError(f"{num_bad} invalid line(s){more}: " + "; ".join(errors), errors)
        if num_rows == 0:
            raise UploadError("file has no rows: upload JSONL with one JSON object per line")
        if len(formats) > 1:
            where = ", ".join(f"{f} (first on line {n})" for f, n in formats.items())
            raise UploadError(f"rows mix data formats: {where}; use one format per file")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return ValidatedUpload(bytes=dest.stat().st_size, num_rows=num_rows, format=next(iter(formats)))
