"""The service's durable state: tenants, tokens, files, jobs, events and checkpoints.

``Store`` is the interface the API and the worker use; ``SQLiteStore`` is the embedded default (one file,
``DATA_DIR/lorafleet.db``, shared by the API process and the worker process). A PostgreSQL store would
implement the same methods; nothing outside this module writes SQL.

Every write that the API acknowledges is committed before the response is sent, so a SIGKILL of either
process loses nothing acknowledged. Job status changes are compare-and-set (``transition``): the API may
cancel a job while the worker reports it running, and whichever lands second sees that the job is already
terminal and changes nothing.
"""

from __future__ import annotations

import abc
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ACTIVE_STATUSES",
    "JOB_STATUSES",
    "TERMINAL_STATUSES",
    "CheckpointRecord",
    "EventRecord",
    "FileRecord",
    "JobRecord",
    "SQLiteStore",
    "Store",
    "TokenRecord",
]

JOB_STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# statuses of unfinished jobs (cancellable; their files stay in use). A paused job waits for resume, off
# the engine; the worker picks up queued and running ones again after a restart.
ACTIVE_STATUSES = ("validating_files", "queued", "running", "paused")


@dataclass
class TokenRecord:
    """An API token; only the SHA-256 of its secret is stored."""

    id: str
    tenant: str
    token_hash: str
    created_at: float
    revoked_at: float | None = None


@dataclass
class FileRecord:
    """An uploaded, validated JSONL file; its bytes live at ``DATA_DIR/files/<id>.jsonl``."""

    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    num_rows: int
    format: str
    created_at: float


@dataclass
class JobRecord:
    """A fine-tuning job. ``spec`` is the validated request (adapter, hyperparameters, files...)."""

    id: str
    tenant: str
    status: str
    spec: dict[str, Any]
    adapter_id: str
    created_at: float
    priority: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    step: int = 0
    total_steps: int | None = None
    trained_tokens: int = 0
    updated_at: float = 0.0


@dataclass
class EventRecord:
    """One job event. ``type`` is ``metrics`` (one per optimizer step, ``step`` set) or ``message``."""

    job_id: str
    type: str
    message: str
    created_at: float
    level: str = "info"
    step: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    seq: int = 0  # assigned by the store; the cursor for pagination


@dataclass
class CheckpointRecord:
    """A checkpoint the engine wrote for a job at ``step``."""

    job_id: str
    step: int
    path: str
    created_at: float
    metrics: dict[str, Any] = field(default_factory=dict)
    seq: int = 0


class Store(abc.ABC):
    """What the API and the worker need from a database. Methods that take ``tenant`` never return another
    tenant's rows; the ``*_any`` methods are for the worker, which serves every tenant."""

    # tenants and tokens
    @abc.abstractmethod
    def add_token(self, token: TokenRecord) -> None: ...

    @abc.abstractmethod
    def tenant_for_token_hash(self, token_hash: str) -> str | None:
        """The tenant of a live (not revoked) token, or None."""

    @abc.abstractmethod
    def list_tokens(self, tenant: str | None = None) -> list[TokenRecord]: ...

    @abc.abstractmethod
    def revoke_token(self, token_id: str) -> bool:
        """True when a live token was revoked."""

    # files
    @abc.abstractmethod
    def add_file(self, rec: FileRecord) -> None: ...

    @abc.abstractmethod
    def get_file(self, tenant: str, file_id: str) -> FileRecord | None: ...

    @abc.abstractmethod
    def list_files(self, tenant: str, after: str | None, limit: int) -> tuple[list[FileRecord], bool]:
        """Newest first; ``after`` is the last id of the previous page; returns (page, has_more)."""

    @abc.abstractmethod
    def delete_file(self, tenant: str, file_id: str) -> bool: ...

    @abc.abstractmethod
    def active_jobs_using_file(self, tenant: str, file_id: str) -> list[str]: ...

    # jobs
    @abc.abstractmethod
    def add_job(self, rec: JobRecord) -> None: ...

    @abc.abstractmethod
    def get_job(self, tenant: str, job_id: str) -> JobRecord | None: ...

    @abc.abstractmethod
    def get_job_any(self, job_id: str) -> JobRecord | None: ...

    @abc.abstractmethod
    def list_jobs(
        self, tenant: str, after: str | None, limit: int, status: str | None = None
    ) -> tuple[list[JobRecord], bool]:
        """Newest first, only ``status`` when given; ``after`` is the last id of the previous page; returns
        (page, has_more)."""

    @abc.abstractmethod
    def jobs_with_status(self, statuses: Iterable[str]) -> list[JobRecord]:
        """Every tenant's jobs in ``statuses``, by priority (high first) then age (old first)."""

    @abc.abstractmethod
    def transition(self, job_id: str, to: str, allowed_from: Iterable[str], **fields: Any) -> bool:
        """Set ``status = to`` (and ``fields``) only if the status is in ``allowed_from``; True if it was."""

    @abc.abstractmethod
    def update_progress(
        self, job_id: str, step: int, total_steps: int | None, trained_tokens: int | None
    ) -> None: ...

    @abc.abstractmethod
    def get_adapter_job(self, tenant: str, adapter_id: str) -> JobRecord | None:
        """The job that produces adapter ``adapter_id``, if it belongs to ``tenant``."""

    # events and checkpoints
    @abc.abstractmethod
    def add_events(self, events: list[EventRecord]) -> None:
        """Append events; a ``metrics`` event replaces an earlier one for the same job and step (a job
        resumed from a checkpoint trains those steps again)."""

    @abc.abstractmethod
    def list_events(
        self, job_id: str, after: int | None, limit: int, ascending: bool
    ) -> tuple[list[EventRecord], bool]: ...

    @abc.abstractmethod
    def add_checkpoint(self, rec: CheckpointRecord) -> None:
        """Record a checkpoint; one per (job, step), a later one for the same step replaces it."""

    @abc.abstractmethod
    def list_checkpoints(
        self, job_id: str, after: int | None, limit: int
    ) -> tuple[list[CheckpointRecord], bool]:
        """Newest first."""

    # small key-value state (worker heartbeat, schema version)
    @abc.abstractmethod
    def set_meta(self, key: str, value: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def get_meta(self, key: str) -> dict[str, Any] | None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, token_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL, revoked_at REAL);
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,
    filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL, num_rows INTEGER NOT NULL,
    format TEXT NOT NULL, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS files_tenant ON files(tenant, seq);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,
    status TEXT NOT NULL, spec TEXT NOT NULL, adapter_id TEXT NOT NULL UNIQUE, priority INTEGER NOT NULL,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL, error TEXT, step INTEGER NOT NULL,
    total_steps INTEGER, trained_tokens INTEGER NOT NULL, updated_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs(tenant, seq);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE TABLE IF NOT EXISTS job_files (job_id TEXT NOT NULL, file_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS job_files_file ON job_files(file_id);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, type TEXT NOT NULL, level TEXT NOT NULL,
    message TEXT NOT NULL, step INTEGER, data TEXT NOT NULL, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
CREATE UNIQUE INDEX IF NOT EXISTS events_metrics ON events(job_id, step) WHERE type = 'metrics';
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, step INTEGER NOT NULL, path TEXT NOT NULL,
    metrics TEXT NOT NULL, created_at REAL NOT NULL, UNIQUE(job_id, step));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_JOB_COLUMNS = (
    "id, tenant, status, spec, adapter_id, priority, created_at, started_at, finished_at, error, step, "
    "total_steps, trained_tokens, updated_at"
)
# columns ``transition`` may set besides the status
_JOB_MUTABLE = frozenset({"started_at", "finished_at", "error", "step", "total_steps", "trained_tokens"})


def _job(row: sqlite3.Row) -> JobRecord:
    d = dict(row)
    d["spec"] = json.loads(d["spec"])
    return JobRecord(**d)


def _event(row: sqlite3.Row) -> EventRecord:
    d = dict(row)
    d["data"] = json.loads(d["data"])
    return EventRecord(**d)


def _checkpoint(row: sqlite3.Row) -> CheckpointRecord:
    d = dict(row)
    d["metrics"] = json.loads(d["metrics"])
    return CheckpointRecord(**d)


class SQLiteStore(Store):
    """``Store`` on one SQLite file in WAL mode: readers never block the writer, and the API process and
    the worker process can both hold it open. One connection per thread (sqlite3 connections are not
    shared across threads); writes take the write lock up front (``BEGIN IMMEDIATE``) so that two processes
    never deadlock upgrading a read lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # executescript runs each statement in autocommit mode; IF NOT EXISTS makes it safe for the API and
        # the worker to run it concurrently
        self._conn().executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable in WAL mode against process crashes (SIGKILL); FULL would add an fsync
            # per commit, needed only against power loss.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, args).fetchall()

    # tenants and tokens
    def add_token(self, token: TokenRecord) -> None:
        with self._write() as c:
            c.execute(
                "INSERT INTO tokens (id, tenant, token_hash, created_at, revoked_at) VALUES (?, ?, ?, ?, ?)",
                (token.id, token.tenant, token.token_hash, token.created_at, token.revoked_at),
            )

    def tenant_for_token_hash(self, token_hash: str) -> str | None:
        rows = self._read(
            "SELECT tenant FROM tokens WHERE token_hash = ? AND revoked_at IS NULL", (token_hash,)
        )
        return rows[0]["tenant"] if rows else None

    def list_tokens(self, tenant: str | None = None) -> list[TokenRecord]:
        if tenant is None:
            rows = self._read("SELECT * FROM tokens ORDER BY created_at")
        else:
            rows = self._read("SELECT * FROM tokens WHERE tenant = ? ORDER BY created_at", (tenant,))
        return [TokenRecord(**dict(r)) for r in rows]

    def revoke_token(self, token_id: str) -> bool:
        with self._write() as c:
            cur = c.execute(
                "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (time.time(), token_id),
            )
            return cur.rowcount == 1

    # files
    def add_file(self, rec: FileRecord) -> None:
        with self._write() as c:
            c.execute(
                "INSERT INTO files (id, tenant, filename, purpose, bytes, num_rows, format, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.id,
                    rec.tenant,
                    rec.filename,
                    rec.purpose,
                    rec.bytes,
                    rec.num_rows,
                    rec.format,
                    rec.created_at,
                ),
            )

    def get_file(self, tenant: str, file_id: str) -> FileRecord | None:
        rows = self._read(
            "SELECT id, tenant, filename, purpose, bytes, num_rows, format, created_at FROM files "
            "WHERE id = ? AND tenant = ?",
            (file_id, tenant),
        )
        return FileRecord(**dict(rows[0])) if rows else None

    def list_files(self, tenant: str, after: str | None, limit: int) -> tuple[list[FileRecord], bool]:
        cols = "id, tenant, filename, purpose, bytes, num_rows, format, created_at"
        rows = self._page("files", cols, tenant, after, limit)
        return [FileRecord(**dict(r)) for r in rows[:limit]], len(rows) > limit

    def _page(
        self, table: str, cols: str, tenant: str, after: str | None, limit: int, status: str | None = None
    ) -> list[sqlite3.Row]:
        # ``table`` and ``cols`` are constants of this module, never user input; an unknown ``after`` id
        # (another tenant's, or none) gives an empty page
        where, args = "tenant = ?", [tenant]
        if status is not None:
            where, args = where + " AND status = ?", [*args, status]
        if after is not None:
            where += f" AND seq < COALESCE((SELECT seq FROM {table} WHERE id = ? AND tenant = ?), -1)"
            args += [after, tenant]
        return self._read(
            f"SELECT {cols} FROM {table} WHERE {where} ORDER BY seq DESC LIMIT ?", (*args, limit + 1)
        )

    def delete_file(self, tenant: str, file_id: str) -> bool:
        with self._write() as c:
            return c.execute("DELETE FROM files WHERE id = ? AND tenant = ?", (file_id, tenant)).rowcount == 1

    def active_jobs_using_file(self, tenant: str, file_id: str) -> list[str]:
        marks = ",".join("?" * len(ACTIVE_STATUSES))
        rows = self._read(
            f"SELECT jobs.id FROM job_files JOIN jobs ON jobs.id = job_files.job_id "
            f"WHERE job_files.file_id = ? AND jobs.tenant = ? AND jobs.status IN ({marks})",
            (file_id, tenant, *ACTIVE_STATUSES),
        )
        return [r["id"] for r in rows]

    # jobs
    def add_job(self, rec: JobRecord) -> None:
        now = time.time()
        with self._write() as c:
            c.execute(
                f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES ({','.join('?' * 14)})",
                (
                    rec.id, rec.tenant, rec.status, json.dumps(rec.spec), rec.adapter_id, rec.priority,
                    rec.created_at, rec.started_at, rec.finished_at, rec.error, rec.step, rec.total_steps,
                    rec.trained_tokens, now,
                ),
            )  # fmt: skip
            for key in ("training_file", "validation_file"):
                if rec.spec.get(key):
                    c.execute(
                        "INSERT INTO job_files (job_id, file_id) VALUES (?, ?)", (rec.id, rec.spec[key])
                    )

    def get_job(self, tenant: str, job_id: str) -> JobRecord | None:
        rows = self._read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant))
        return _job(rows[0]) if rows else None

    def get_job_any(self, job_id: str) -> JobRecord | None:
        rows = self._read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def list_jobs(
        self, tenant: str, after: str | None, limit: int, status: str | None = None
    ) -> tuple[list[JobRecord], bool]:
        rows = self._page("jobs", _JOB_COLUMNS, tenant, after, limit, status)
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    def jobs_with_status(self, statuses: Iterable[str]) -> list[JobRecord]:
        statuses = tuple(statuses)
        marks = ",".join("?" * len(statuses))
        rows = self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status IN ({marks}) ORDER BY priority DESC, seq ASC",
            statuses,
        )
        return [_job(r) for r in rows]

    def transition(self, job_id: str, to: str, allowed_from: Iterable[str], **fields: Any) -> bool:
        assert to in JOB_STATUSES, to
        unknown = set(fields) - _JOB_MUTABLE
        assert not unknown, unknown
        allowed = tuple(allowed_from)
        sets = "".join(f", {k} = ?" for k in fields)
        marks = ",".join("?" * len(allowed))
        with self._write() as c:
            cur = c.execute(
                f"UPDATE jobs SET status = ?, updated_at = ?{sets} WHERE id = ? AND status IN ({marks})",
                (to, time.time(), *fields.values(), job_id, *allowed),
            )
            return cur.rowcount == 1

    def update_progress(
        self, job_id: str, step: int, total_steps: int | None, trained_tokens: int | None
    ) -> None:
        with self._write() as c:
            c.execute(
                "UPDATE jobs SET step = ?, total_steps = COALESCE(?, total_steps), "
                "trained_tokens = COALESCE(?, trained_tokens), updated_at = ? WHERE id = ?",
                (step, total_steps, trained_tokens, time.time(), job_id),
            )

    def get_adapter_job(self, tenant: str, adapter_id: str) -> JobRecord | None:
        rows = self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE adapter_id = ? AND tenant = ?", (adapter_id, tenant)
        )
        return _job(rows[0]) if rows else None

    # events and checkpoints
    def add_events(self, events: list[EventRecord]) -> None:
        if not events:
            return
        with self._write() as c:
            for e in events:
                if e.type == "metrics":
                    c.execute(
                        "DELETE FROM events WHERE job_id = ? AND type = 'metrics' AND step = ?",
                        (e.job_id, e.step),
                    )
                c.execute(
                    "INSERT INTO events (job_id, type, level, message, step, data, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (e.job_id, e.type, e.level, e.message, e.step, json.dumps(e.data), e.created_at),
                )

    def list_events(
        self, job_id: str, after: int | None, limit: int, ascending: bool
    ) -> tuple[list[EventRecord], bool]:
        cols = "seq, job_id, type, level, message, step, data, created_at"
        if ascending:
            rows = self._read(
                f"SELECT {cols} FROM events WHERE job_id = ? AND seq > ? ORDER BY seq ASC LIMIT ?",
                (job_id, -1 if after is None else after, limit + 1),
            )
        else:
            rows = self._read(
                f"SELECT {cols} FROM events WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                (job_id, 2**62 if after is None else after, limit + 1),
            )
        return [_event(r) for r in rows[:limit]], len(rows) > limit

    def add_checkpoint(self, rec: CheckpointRecord) -> None:
        with self._write() as c:
            c.execute("DELETE FROM checkpoints WHERE job_id = ? AND step = ?", (rec.job_id, rec.step))
            c.execute(
                "INSERT INTO checkpoints (job_id, step, path, metrics, created_at) VALUES (?, ?, ?, ?, ?)",
                (rec.job_id, rec.step, rec.path, json.dumps(rec.metrics), rec.created_at),
            )

    def list_checkpoints(
        self, job_id: str, after: int | None, limit: int
    ) -> tuple[list[CheckpointRecord], bool]:
        rows = self._read(
            "SELECT seq, job_id, step, path, metrics, created_at FROM checkpoints WHERE job_id = ? AND seq < ? "
            "ORDER BY seq DESC LIMIT ?",
            (job_id, 2**62 if after is None else after, limit + 1),
        )
        return [_checkpoint(r) for r in rows[:limit]], len(rows) > limit

    def set_meta(self, key: str, value: dict[str, Any]) -> None:
        with self._write() as c:
            c.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )

    def get_meta(self, key: str) -> dict[str, Any] | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else None
