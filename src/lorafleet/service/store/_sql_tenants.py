"""The tenant methods of ``SQLStore`` (``_sql.py``): fair-share weights, quotas and their checks.

A quota check runs in the transaction of the write it guards, after locking the tenant's row
(``ROW_LOCK``; SQLite's write transaction excludes every other writer anyway), so API processes racing on
one tenant never pass a quota together.
"""

from __future__ import annotations

from typing import Any

from ._sql_leases import Tx
from .base import QuotaExceeded, TenantRecord

__all__ = ["TenantSQL"]

_TENANT_COLUMNS = "tenant, weight, max_running_jobs, max_queued_jobs, max_stored_bytes"


class TenantSQL:
    """Mixin of ``SQLStore``: needs its ``ROW_LOCK``, ``_tx`` and ``_read``."""

    ROW_LOCK: str

    def set_tenant(self, rec: TenantRecord) -> None:
        if rec.weight <= 0:
            raise ValueError(f"--weight must be > 0 (got {rec.weight})")
        for name in ("max_running_jobs", "max_queued_jobs", "max_stored_bytes"):
            v = getattr(rec, name)
            if v is not None and v < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (got {v})")
        with self._tx() as tx:  # type: ignore[attr-defined]
            tx.execute(
                f"INSERT INTO tenants ({_TENANT_COLUMNS}) VALUES (?, ?, ?, ?, ?) ON CONFLICT(tenant) DO UPDATE "
                "SET weight = excluded.weight, max_running_jobs = excluded.max_running_jobs, "
                "max_queued_jobs = excluded.max_queued_jobs, max_stored_bytes = excluded.max_stored_bytes",
                (rec.tenant, rec.weight, rec.max_running_jobs, rec.max_queued_jobs, rec.max_stored_bytes),
            )

    def get_tenant(self, tenant: str) -> TenantRecord:
        rows = self._read(f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE tenant = ?", (tenant,))  # type: ignore[attr-defined]
        return TenantRecord(**rows[0]) if rows else TenantRecord(tenant)

    def list_tenants(self) -> list[TenantRecord]:
        rows = self._read(f"SELECT {_TENANT_COLUMNS} FROM tenants")  # type: ignore[attr-defined]
        known = {r["tenant"]: TenantRecord(**r) for r in rows}
        for r in self._read("SELECT DISTINCT tenant FROM tokens"):  # type: ignore[attr-defined]
            known.setdefault(r["tenant"], TenantRecord(r["tenant"]))
        return [known[t] for t in sorted(known)]

    def _tenant_limits(self, tx: Tx, tenant: str) -> dict[str, Any] | None:
        rows = tx.query(f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE tenant = ?{self.ROW_LOCK}", (tenant,))
        return rows[0] if rows else None

    def _check_queued(self, tx: Tx, tenant: str) -> None:
        limits = self._tenant_limits(tx, tenant)
        if limits is None or limits["max_queued_jobs"] is None:
            return
        used = tx.query(
            "SELECT COUNT(*) AS n FROM jobs WHERE tenant = ? AND status IN ('validating_files', 'queued') "
            "AND lease_holder IS NULL",
            (tenant,),
        )[0]["n"]
        if used >= limits["max_queued_jobs"]:
            raise QuotaExceeded(tenant, "max_queued_jobs", limits["max_queued_jobs"], int(used))

    def _check_stored(self, tx: Tx, tenant: str, adding: int) -> None:
        limits = self._tenant_limits(tx, tenant)
        if limits is None or limits["max_stored_bytes"] is None:
            return
        used = int(
            tx.query("SELECT COALESCE(SUM(bytes), 0) AS n FROM files WHERE tenant = ?", (tenant,))[0]["n"]
        )
        if used + adding > limits["max_stored_bytes"]:
            raise QuotaExceeded(tenant, "max_stored_bytes", limits["max_stored_bytes"], used)
