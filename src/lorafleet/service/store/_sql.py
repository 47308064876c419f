"""The ``Store`` methods in SQL that SQLite and PostgreSQL both speak; each backend adds its connections,
transactions, clock and row locks (``sqlite.py``, ``postgres.py``).

Statements use ``?`` placeholders (the PostgreSQL backend rewrites them). Table and column names in
f-strings are constants of this module, never user input.
"""

from __future__ import annotations

import abc
import json
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

from ._sql_leases import JOB_COLUMNS, LeaseSQL, Tx, job_from_row, marks
from ._sql_tenants import TenantSQL
from .base import (
    ACTIVE_STATUSES,
    JOB_STATUSES,
    TERMINAL_STATUSES,
    CheckpointRecord,
    EventRecord,
    FileRecord,
    JobRecord,
    Lease,
    LeaseLost,
    Store,
    TokenRecord,
)
from .migrations import MIGRATIONS, Dialect

__all__ = ["SQLStore", "Tx"]

_FILE_COLUMNS = "id, tenant, filename, purpose, bytes, num_rows, format, created_at"
_EVENT_COLUMNS = "seq, job_id, type, level, message, step, data, created_at, lease_token"
# columns ``transition`` may set besides the status
_JOB_MUTABLE = frozenset({"started_at", "finished_at", "error", "step", "total_steps", "trained_tokens"})
_MAX_SEQ = 2**62


def _event(row: dict[str, Any]) -> EventRecord:
    d = dict(row)
    d["data"] = json.loads(d["data"])
    return EventRecord(**d)


def _checkpoint(row: dict[str, Any]) -> CheckpointRecord:
    d = dict(row)
    d["metrics"] = json.loads(d["metrics"])
    return CheckpointRecord(**d)


class SQLStore(LeaseSQL, TenantSQL, Store, abc.ABC):
    """The shared implementation. A backend provides ``_tx`` (a write transaction), ``_read`` (one query
    outside a transaction), ``NOW`` (its clock as SQL), ``SKIP_LOCKED`` and ``ROW_LOCK`` (the suffixes
    that lock rows for a claim and for a fenced write; empty where the transaction already excludes other
    writers), ``DIALECT`` (for the migrations) and ``_migration_lock`` (statements that serialize
    migrations within their transaction)."""

    NOW: str
    SKIP_LOCKED: str
    ROW_LOCK: str
    DIALECT: Dialect

    @abc.abstractmethod
    def _tx(self) -> AbstractContextManager[Tx]: ...

    @abc.abstractmethod
    def _read(self, sql: str, args: tuple | list = ()) -> list[dict[str, Any]]: ...

    def _migration_lock(self, tx: Tx) -> None:
        """Serialize concurrent migrations inside ``tx``."""

    # -- schema -----------------------------------------------------------------------------------------

    def _migrate(self) -> None:
        with self._tx() as tx:
            # under the lock too: PostgreSQL's CREATE TABLE IF NOT EXISTS is not safe against a concurrent one
            self._migration_lock(tx)
            tx.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                f"description TEXT NOT NULL, applied_at {self.DIALECT.real} NOT NULL)"
            )
        for m in MIGRATIONS:
            with self._tx() as tx:
                self._migration_lock(tx)
                if tx.query("SELECT version FROM schema_migrations WHERE version = ?", (m.version,)):
                    continue
                for statement in m.statements:
                    tx.execute(self.DIALECT.render(statement))
                tx.execute(
                    "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                    (m.version, m.description, time.time()),
                )

    def schema_version(self) -> int:
        rows = self._read("SELECT MAX(version) AS v FROM schema_migrations")
        return int(rows[0]["v"] or 0)

    def now(self) -> float:
        return float(self._read(f"SELECT {self.NOW} AS now")[0]["now"])

    # -- tenants and tokens -----------------------------------------------------------------------------

    def add_token(self, token: TokenRecord) -> None:
        with self._tx() as tx:
            tx.execute(
                "INSERT INTO tokens (id, tenant, token_hash, created_at, revoked_at) VALUES (?, ?, ?, ?, ?)",
                (token.id, token.tenant, token.token_hash, token.created_at, token.revoked_at),
            )

    def tenant_for_token_hash(self, token_hash: str) -> str | None:
        rows = self._read(
            "SELECT tenant FROM tokens WHERE token_hash = ? AND revoked_at IS NULL", (token_hash,)
        )
        return rows[0]["tenant"] if rows else None

    def list_tokens(self, tenant: str | None = None) -> list[TokenRecord]:
        cols = "id, tenant, token_hash, created_at, revoked_at"
        if tenant is None:
            rows = self._read(f"SELECT {cols} FROM tokens ORDER BY created_at")
        else:
            rows = self._read(f"SELECT {cols} FROM tokens WHERE tenant = ? ORDER BY created_at", (tenant,))
        return [TokenRecord(**r) for r in rows]

    def revoke_token(self, token_id: str) -> bool:
        with self._tx() as tx:
            return (
                tx.execute(
                    "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                    (time.time(), token_id),
                )
                == 1
            )

    # -- files ------------------------------------------------------------------------------------------

    def add_file(self, rec: FileRecord) -> None:
        with self._tx() as tx:
            self._check_stored(tx, rec.tenant, rec.bytes)
            tx.execute(
                f"INSERT INTO files ({_FILE_COLUMNS}) VALUES ({marks(8)})",
                (rec.id, rec.tenant, rec.filename, rec.purpose, rec.bytes, rec.num_rows, rec.format,
                 rec.created_at),
            )  # fmt: skip

    def get_file(self, tenant: str, file_id: str) -> FileRecord | None:
        rows = self._read(f"SELECT {_FILE_COLUMNS} FROM files WHERE id = ? AND tenant = ?", (file_id, tenant))
        return FileRecord(**rows[0]) if rows else None

    def list_files(self, tenant: str, after: str | None, limit: int) -> tuple[list[FileRecord], bool]:
        rows = self._page("files", _FILE_COLUMNS, tenant, after, limit)
        return [FileRecord(**r) for r in rows[:limit]], len(rows) > limit

    def _page(
        self, table: str, cols: str, tenant: str, after: str | None, limit: int, status: str | None = None
    ) -> list[dict[str, Any]]:
        # an unknown ``after`` id (another tenant's, or none) gives an empty page
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
        with self._tx() as tx:
            return tx.execute("DELETE FROM files WHERE id = ? AND tenant = ?", (file_id, tenant)) == 1

    def active_jobs_using_file(self, tenant: str, file_id: str) -> list[str]:
        rows = self._read(
            f"SELECT jobs.id FROM job_files JOIN jobs ON jobs.id = job_files.job_id "
            f"WHERE job_files.file_id = ? AND jobs.tenant = ? AND jobs.status IN ({marks(len(ACTIVE_STATUSES))})",
            (file_id, tenant, *ACTIVE_STATUSES),
        )
        return [r["id"] for r in rows]

    # -- jobs -------------------------------------------------------------------------------------------

    def add_job(self, rec: JobRecord) -> None:
        with self._tx() as tx:
            if rec.status in ("validating_files", "queued"):
                self._check_queued(tx, rec.tenant)
            tx.execute(
                f"INSERT INTO jobs ({JOB_COLUMNS}, model) VALUES ({marks(15)})",
                (
                    rec.id, rec.tenant, rec.status, json.dumps(rec.spec), rec.adapter_id, rec.priority,
                    rec.created_at, rec.started_at, rec.finished_at, rec.error, rec.step, rec.total_steps,
                    rec.trained_tokens, time.time(), str(rec.spec.get("model") or ""),
                ),
            )  # fmt: skip
            for key in ("training_file", "validation_file"):
                if rec.spec.get(key):
                    tx.execute(
                        "INSERT INTO job_files (job_id, file_id) VALUES (?, ?)", (rec.id, rec.spec[key])
                    )

    def get_job(self, tenant: str, job_id: str) -> JobRecord | None:
        rows = self._read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant))
        return job_from_row(rows[0]) if rows else None

    def get_job_any(self, job_id: str) -> JobRecord | None:
        rows = self._read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return job_from_row(rows[0]) if rows else None

    def list_jobs(
        self, tenant: str, after: str | None, limit: int, status: str | None = None
    ) -> tuple[list[JobRecord], bool]:
        rows = self._page("jobs", JOB_COLUMNS, tenant, after, limit, status)
        return [job_from_row(r) for r in rows[:limit]], len(rows) > limit

    def jobs_with_status(self, statuses: Iterable[str], model: str | None = None) -> list[JobRecord]:
        statuses = tuple(statuses)
        where, args = f"status IN ({marks(len(statuses))})", list(statuses)
        if model is not None:
            where, args = where + " AND model = ?", [*args, model]
        rows = self._read(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE {where} ORDER BY priority DESC, seq ASC", args
        )
        return [job_from_row(r) for r in rows]

    def _fence(self, tx: Tx, lease: Lease) -> None:
        """Raise ``LeaseLost`` unless ``lease`` is its job's current lease; locks the job's row until the
        transaction ends (PostgreSQL), so no claim can slip in between this check and the write."""
        rows = tx.query(
            f"SELECT lease_token, lease_holder FROM jobs WHERE id = ?{self.ROW_LOCK}", (lease.job_id,)
        )
        if not rows or rows[0]["lease_token"] != lease.token or rows[0]["lease_holder"] != lease.holder:
            raise LeaseLost(lease.job_id, lease.token)

    def transition(
        self, job_id: str, to: str, allowed_from: Iterable[str], lease: Lease | None = None, **fields: Any
    ) -> bool:
        if to not in JOB_STATUSES:
            raise ValueError(f"unknown job status {to!r}")
        unknown = set(fields) - _JOB_MUTABLE
        if unknown:
            raise ValueError(f"transition cannot set {sorted(unknown)}")
        allowed = tuple(allowed_from)
        sets = "".join(f", {k} = ?" for k in fields)
        if to in TERMINAL_STATUSES:  # a finished job needs no lease
            sets += ", lease_holder = NULL"
        with self._tx() as tx:
            if lease is not None:
                self._fence(tx, lease)
            changed = tx.execute(
                f"UPDATE jobs SET status = ?, updated_at = ?{sets} WHERE id = ? AND status IN ({marks(len(allowed))})",
                (to, time.time(), *fields.values(), job_id, *allowed),
            )
            if changed and to in TERMINAL_STATUSES:
                tx.execute(
                    f"UPDATE leases SET released_at = {self.NOW} WHERE job_id = ? AND released_at IS NULL "
                    "AND token = (SELECT lease_token FROM jobs WHERE id = ?)",
                    (job_id, job_id),
                )
            return changed == 1

    def update_progress(
        self, job_id: str, step: int, total_steps: int | None, trained_tokens: int | None,
        lease: Lease | None = None,
    ) -> None:  # fmt: skip
        with self._tx() as tx:
            if lease is not None:
                self._fence(tx, lease)
            tx.execute(
                "UPDATE jobs SET step = ?, total_steps = COALESCE(?, total_steps), "
                "trained_tokens = COALESCE(?, trained_tokens), updated_at = ? WHERE id = ?",
                (step, total_steps, trained_tokens, time.time(), job_id),
            )

    def get_adapter_job(self, tenant: str, adapter_id: str) -> JobRecord | None:
        rows = self._read(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE adapter_id = ? AND tenant = ?", (adapter_id, tenant)
        )
        return job_from_row(rows[0]) if rows else None

    # -- events and checkpoints -------------------------------------------------------------------------

    def add_events(self, events: list[EventRecord], lease: Lease | None = None) -> None:
        if not events:
            return
        with self._tx() as tx:
            token = 0
            if lease is not None:
                self._fence(tx, lease)
                token = lease.token
                if any(e.job_id != lease.job_id for e in events):
                    raise ValueError("events under a lease must all be for the lease's job")
            for e in events:
                # a step trained again after a resume updates its metrics event in place: the same id, the
                # same place in the list, so a reader following the list never sees an event move or vanish
                if e.type == "metrics" and tx.execute(
                    "UPDATE events SET level = ?, message = ?, data = ?, lease_token = ? "
                    "WHERE job_id = ? AND type = 'metrics' AND step = ?",
                    (e.level, e.message, json.dumps(e.data), token, e.job_id, e.step),
                ):
                    continue
                tx.execute(
                    "INSERT INTO events (job_id, type, level, message, step, data, created_at, lease_token) "
                    f"VALUES ({marks(8)})",
                    (e.job_id, e.type, e.level, e.message, e.step, json.dumps(e.data), e.created_at, token),
                )

    def list_events(
        self, job_id: str, after: int | None, limit: int, ascending: bool
    ) -> tuple[list[EventRecord], bool]:
        if ascending:
            rows = self._read(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE job_id = ? AND seq > ? ORDER BY seq ASC LIMIT ?",
                (job_id, -1 if after is None else after, limit + 1),
            )
        else:
            rows = self._read(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                (job_id, _MAX_SEQ if after is None else after, limit + 1),
            )
        return [_event(r) for r in rows[:limit]], len(rows) > limit

    def add_checkpoint(self, rec: CheckpointRecord, lease: Lease | None = None) -> None:
        with self._tx() as tx:
            if lease is not None:
                self._fence(tx, lease)
            tx.execute("DELETE FROM checkpoints WHERE job_id = ? AND step = ?", (rec.job_id, rec.step))
            tx.execute(
                "INSERT INTO checkpoints (job_id, step, path, metrics, created_at) VALUES (?, ?, ?, ?, ?)",
                (rec.job_id, rec.step, rec.path, json.dumps(rec.metrics), rec.created_at),
            )

    def list_checkpoints(
        self, job_id: str, after: int | None, limit: int
    ) -> tuple[list[CheckpointRecord], bool]:
        rows = self._read(
            "SELECT seq, job_id, step, path, metrics, created_at FROM checkpoints WHERE job_id = ? AND seq < ? "
            "ORDER BY seq DESC LIMIT ?",
            (job_id, _MAX_SEQ if after is None else after, limit + 1),
        )
        return [_checkpoint(r) for r in rows[:limit]], len(rows) > limit

    # -- meta -------------------------------------------------------------------------------------------

    def set_meta(self, key: str, value: dict[str, Any]) -> None:
        with self._tx() as tx:
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )

    def get_meta(self, key: str) -> dict[str, Any] | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else None
