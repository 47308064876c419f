"""The lease and worker methods of ``SQLStore`` (``_sql.py``): claims, renewals, releases, the lease history
and the workers' announcements, in SQL that SQLite and PostgreSQL both speak. The backend's ``NOW`` is the
clock of every lease; ``SKIP_LOCKED`` makes concurrent claims take different rows."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from ..fairshare import Candidate, TenantLoad, fair_order
from .base import CLAIMABLE_STATUSES, RENEWABLE_STATUSES, JobRecord, Lease, LeaseGrant, WorkerRecord

__all__ = ["FAIR_SHARE_WINDOW_S", "JOB_COLUMNS", "LeaseSQL", "Tx", "job_from_row", "marks"]

# how far back a tenant's finished jobs count for its average tokens per step
FAIR_SHARE_WINDOW_S = 600.0
_MAX_CANDIDATES = 1000  # claimable jobs one claim looks at

JOB_COLUMNS = (
    "id, tenant, status, spec, adapter_id, priority, created_at, started_at, finished_at, error, step, "
    "total_steps, trained_tokens, updated_at"
)
_WORKER_COLUMNS = (
    "id, host, pid, base_model, state, max_concurrent_tasks, max_tokens_per_micro_batch, active_jobs, "
    "message, heartbeat_at"
)


class Tx(Protocol):
    """One transaction of a backend."""

    def execute(self, sql: str, args: tuple | list = ()) -> int:
        """Run a statement; the number of rows it changed."""

    def query(self, sql: str, args: tuple | list = ()) -> list[dict[str, Any]]:
        """Run a query; its rows as dicts."""


def job_from_row(row: dict[str, Any]) -> JobRecord:
    d = dict(row)
    d["spec"] = json.loads(d["spec"])
    return JobRecord(**d)


def marks(n: int) -> str:
    return ",".join("?" * n)


class LeaseSQL:
    """Mixin of ``SQLStore``: needs its ``NOW``, ``SKIP_LOCKED``, ``_tx`` and ``_read``."""

    NOW: str
    SKIP_LOCKED: str

    def _tx(self) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    def _read(self, sql: str, args: tuple | list = ()) -> list[dict[str, Any]]:
        raise NotImplementedError

    # -- leases -----------------------------------------------------------------------------------------

    def claim_jobs(
        self, holder: str, model: str, limit: int, lease_s: float
    ) -> list[tuple[JobRecord, Lease]]:
        if limit <= 0:
            return []
        out = []
        with self._tx() as tx:
            rows = tx.query(
                f"SELECT seq, {JOB_COLUMNS} FROM jobs WHERE status IN ({marks(len(CLAIMABLE_STATUSES))}) "
                f"AND model = ? AND (lease_holder IS NULL OR lease_expires < {self.NOW}) "
                f"ORDER BY priority DESC, seq ASC LIMIT ?{self.SKIP_LOCKED}",
                (*CLAIMABLE_STATUSES, model, _MAX_CANDIDATES),
            )
            if not rows:
                return []
            by_id = {r["id"]: r for r in rows}
            candidates = [Candidate(r["id"], r["tenant"], r["priority"], r["seq"]) for r in rows]
            for c in fair_order(candidates, self._loads(tx, model), limit):
                row = dict(by_id[c.job_id])
                row.pop("seq")
                got = tx.query(
                    f"UPDATE jobs SET lease_holder = ?, lease_token = lease_token + 1, "
                    f"lease_expires = {self.NOW} + ? WHERE id = ? RETURNING lease_token, lease_expires",
                    (holder, lease_s, c.job_id),
                )[0]
                tx.execute(
                    f"INSERT INTO leases (job_id, token, holder, granted_at, expires_at) VALUES (?, ?, ?, {self.NOW}, ?)",
                    (c.job_id, got["lease_token"], holder, got["lease_expires"]),
                )
                out.append(
                    (
                        job_from_row(row),
                        Lease(c.job_id, holder, int(got["lease_token"]), float(got["lease_expires"])),
                    )
                )
        return out

    def _loads(self, tx: Tx, model: str) -> dict[str, TenantLoad]:
        """Each tenant's tokens per step over its leased jobs on ``model`` (and how many of those have not
        trained a step yet), its leased jobs on every model,
        the average tokens per step of its jobs in the window, its weight and running-jobs quota."""
        since = time.time() - FAIR_SHARE_WINDOW_S
        live = f"lease_holder IS NOT NULL AND lease_expires >= {self.NOW}"
        rate = "CASE WHEN step > 0 THEN trained_tokens * 1.0 / step ELSE NULL END"
        rows = tx.query(
            f"SELECT tenant, SUM(CASE WHEN {live} AND model = ? THEN COALESCE({rate}, 0) ELSE 0 END) AS load, "
            f"SUM(CASE WHEN {live} THEN 1 ELSE 0 END) AS running, "
            f"SUM(CASE WHEN {live} AND model = ? AND step = 0 THEN 1 ELSE 0 END) AS starting, "
            f"AVG(CASE WHEN model = ? THEN {rate} ELSE NULL END) AS avg_rate "
            f"FROM jobs WHERE {live} OR updated_at > ? GROUP BY tenant",
            (model, model, model, since),
        )
        measured = {r["tenant"]: r for r in rows}
        limits = {r["tenant"]: r for r in tx.query("SELECT tenant, weight, max_running_jobs FROM tenants")}
        out = {}
        for t in {*measured, *limits}:
            m, lim = measured.get(t), limits.get(t)
            out[t] = TenantLoad(
                tokens_per_step=float(m["load"] or 0) if m else 0.0, running=int(m["running"] or 0) if m else 0,
                job_tokens_per_step=float(m["avg_rate"]) if m and m["avg_rate"] is not None else None,
                starting=int(m["starting"] or 0) if m else 0,
                weight=float(lim["weight"]) if lim else 1.0,
                max_running_jobs=None if lim is None or lim["max_running_jobs"] is None else int(lim["max_running_jobs"]),
            )  # fmt: skip
        return out

    def renew_leases(self, leases: Iterable[Lease], lease_s: float) -> list[Lease]:
        kept = []
        with self._tx() as tx:
            for lease in leases:
                rows = tx.query(
                    f"UPDATE jobs SET lease_expires = {self.NOW} + ? WHERE id = ? AND lease_token = ? "
                    f"AND lease_holder = ? AND status IN ({marks(len(RENEWABLE_STATUSES))}) "
                    "RETURNING lease_expires",
                    (lease_s, lease.job_id, lease.token, lease.holder, *RENEWABLE_STATUSES),
                )
                if rows:
                    tx.execute(
                        "UPDATE leases SET expires_at = ? WHERE job_id = ? AND token = ?",
                        (rows[0]["lease_expires"], lease.job_id, lease.token),
                    )
                    kept.append(
                        Lease(lease.job_id, lease.holder, lease.token, float(rows[0]["lease_expires"]))
                    )
        return kept

    def release_lease(self, lease: Lease) -> bool:
        with self._tx() as tx:
            changed = tx.execute(
                "UPDATE jobs SET lease_holder = NULL, lease_expires = NULL WHERE id = ? AND lease_token = ? "
                "AND lease_holder = ?",
                (lease.job_id, lease.token, lease.holder),
            )
            if changed:
                tx.execute(
                    f"UPDATE leases SET released_at = {self.NOW} WHERE job_id = ? AND token = ?",
                    (lease.job_id, lease.token),
                )
            return changed == 1

    def release_leases_of(self, holder: str) -> int:
        with self._tx() as tx:
            tx.execute(
                f"UPDATE leases SET released_at = {self.NOW} WHERE released_at IS NULL AND holder = ? "
                "AND token = (SELECT lease_token FROM jobs WHERE jobs.id = leases.job_id AND lease_holder = ?)",
                (holder, holder),
            )
            return tx.execute(
                "UPDATE jobs SET lease_holder = NULL, lease_expires = NULL WHERE lease_holder = ?", (holder,)
            )

    def lease_history(self, job_id: str) -> list[LeaseGrant]:
        rows = self._read(
            "SELECT job_id, token, holder, granted_at, expires_at, released_at FROM leases WHERE job_id = ? "
            "ORDER BY token",
            (job_id,),
        )
        return [LeaseGrant(**r) for r in rows]

    # -- workers ----------------------------------------------------------------------------------------

    def heartbeat(self, rec: WorkerRecord) -> None:
        with self._tx() as tx:
            tx.execute(
                f"INSERT INTO workers ({_WORKER_COLUMNS}) VALUES ({marks(9)}, {self.NOW}) "
                "ON CONFLICT(id) DO UPDATE SET host = excluded.host, pid = excluded.pid, "
                "base_model = excluded.base_model, state = excluded.state, "
                "max_concurrent_tasks = excluded.max_concurrent_tasks, "
                "max_tokens_per_micro_batch = excluded.max_tokens_per_micro_batch, "
                "active_jobs = excluded.active_jobs, message = excluded.message, "
                "heartbeat_at = excluded.heartbeat_at",
                (rec.id, rec.host, rec.pid, rec.base_model, rec.state, rec.max_concurrent_tasks,
                 rec.max_tokens_per_micro_batch, rec.active_jobs, rec.message),
            )  # fmt: skip

    def list_workers(self) -> list[WorkerRecord]:
        rows = self._read(f"SELECT {_WORKER_COLUMNS} FROM workers ORDER BY heartbeat_at DESC, id")
        return [WorkerRecord(**r) for r in rows]
