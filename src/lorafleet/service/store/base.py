"""The ``Store`` interface and the records that cross it (no database code here).

The API processes and the workers share one store: SQLite (``sqlite:///PATH``, one machine) or PostgreSQL
(``postgresql://...``, a fleet). Nothing outside the ``store`` package writes SQL.

Leases. A worker trains a job only while it holds the job's lease (``claim_jobs``): a holder, an expiry on
the store's clock, and a fencing token that grows by one with every grant. The worker renews its leases
with its heartbeat (``renew_leases``); a lease that is not renewed expires, and another worker may claim
the job and resume it from its last checkpoint. Every write a worker makes for a job passes its ``Lease``;
the store checks that the token is still the job's current one in the same transaction as the write, and
raises ``LeaseLost`` otherwise, so a worker that lost a lease (paused, partitioned, presumed dead) can no
longer change the job, its events or its checkpoints.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ACTIVE_STATUSES",
    "CLAIMABLE_STATUSES",
    "JOB_STATUSES",
    "RENEWABLE_STATUSES",
    "TERMINAL_STATUSES",
    "CheckpointRecord",
    "EventRecord",
    "FileRecord",
    "JobRecord",
    "Lease",
    "LeaseGrant",
    "LeaseLost",
    "QuotaExceeded",
    "Store",
    "StoreUnavailable",
    "TenantRecord",
    "TokenRecord",
    "WorkerRecord",
]

JOB_STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# statuses of unfinished jobs (cancellable; their files stay in use). A paused job waits for resume, off
# the engine; workers pick up queued and running ones (again).
ACTIVE_STATUSES = ("validating_files", "queued", "running", "paused")
# statuses a worker claims and trains, under a lease
CLAIMABLE_STATUSES = ("queued", "running")
# statuses whose lease a worker may renew: a job paused while held keeps its lease until the worker has
# checkpointed it and let it go (``release_lease``), so the steps it trained since its last checkpoint
# are not lost; nobody claims a paused job, and resume puts it back to queued
RENEWABLE_STATUSES = (*CLAIMABLE_STATUSES, "paused")


class StoreUnavailable(RuntimeError):
    """The database cannot be reached (down, restarting, network): retry later. The API answers 503."""


class LeaseLost(RuntimeError):
    """A write for a job carried a fencing token that is no longer the job's lease: another worker owns it."""

    def __init__(self, job_id: str, token: int) -> None:
        super().__init__(f"the lease on {job_id} with fencing token {token} is no longer held")
        self.job_id, self.token = job_id, token


class QuotaExceeded(RuntimeError):
    """A request would take a tenant over one of its quotas; the API answers 429 with ``Retry-After``."""

    def __init__(self, tenant: str, quota: str, limit: int, used: int) -> None:
        super().__init__(
            f"tenant {tenant!r} is at its {quota} quota ({used} of {limit}): retry when some of its jobs "
            f"have finished (or files were deleted), or raise it with `lorafleet tenants set {tenant} "
            f"--{quota.replace('_', '-')} N`"
        )
        self.tenant, self.quota, self.limit, self.used = tenant, quota, limit, used


@dataclass
class TenantRecord:
    """A tenant's fair-share weight and quotas (None: no limit). A tenant never set has the defaults."""

    tenant: str
    weight: float = 1.0
    max_running_jobs: int | None = None
    max_queued_jobs: int | None = None  # jobs validating or queued
    max_stored_bytes: int | None = None  # uploaded files


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
    """A fine-tuning job. ``spec`` is the validated request (model, adapter, hyperparameters, files...)."""

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
    """One job event. ``type`` is ``metrics`` (one per optimizer step, ``step`` set) or ``message``.
    ``lease_token`` is the fencing token of the worker that wrote it (0: written by an API process)."""

    job_id: str
    type: str
    message: str
    created_at: float
    level: str = "info"
    step: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    seq: int = 0  # assigned by the store; the cursor for pagination
    lease_token: int = 0


@dataclass
class CheckpointRecord:
    """A checkpoint the engine wrote for a job at ``step``."""

    job_id: str
    step: int
    path: str
    created_at: float
    metrics: dict[str, Any] = field(default_factory=dict)
    seq: int = 0


@dataclass(frozen=True)
class Lease:
    """A worker's right to train one job: valid while ``token`` is the job's current fencing token."""

    job_id: str
    holder: str
    token: int
    expires_at: float  # on the store's clock


@dataclass(frozen=True)
class LeaseGrant:
    """One grant in a job's lease history: ``holder`` held ``token`` from ``granted_at`` until the earlier
    of ``expires_at`` (pushed on by each renewal) and ``released_at`` (None: never given back)."""

    job_id: str
    token: int
    holder: str
    granted_at: float
    expires_at: float
    released_at: float | None


@dataclass
class WorkerRecord:
    """What a worker announces with every heartbeat (``heartbeat_at`` is set by the store's clock)."""

    id: str
    host: str
    pid: int
    base_model: str
    state: str
    max_concurrent_tasks: int
    max_tokens_per_micro_batch: int
    active_jobs: int = 0
    message: str = ""
    heartbeat_at: float = 0.0


class Store(abc.ABC):
    """What the API and the workers need from a database. Methods that take ``tenant`` never return
    another tenant's rows; the ``*_any`` methods are for workers, which serve every tenant. Every method
    raises ``StoreUnavailable`` when the database cannot be reached."""

    url: str

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
    def add_file(self, rec: FileRecord) -> None:
        """Raises ``QuotaExceeded`` when the tenant's stored bytes would pass ``max_stored_bytes``."""

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
    def add_job(self, rec: JobRecord) -> None:
        """Raises ``QuotaExceeded`` when the tenant already has ``max_queued_jobs`` jobs validating or
        queued."""

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
    def jobs_with_status(self, statuses: Iterable[str], model: str | None = None) -> list[JobRecord]:
        """Every tenant's jobs in ``statuses`` (for base model ``model`` when given), by priority (high
        first) then age (old first)."""

    @abc.abstractmethod
    def transition(
        self, job_id: str, to: str, allowed_from: Iterable[str], lease: Lease | None = None, **fields: Any
    ) -> bool:
        """Set ``status = to`` (and ``fields``) only if the status is in ``allowed_from``; True if it was.
        With ``lease``: raises ``LeaseLost`` unless it is the job's current lease; a terminal status
        releases it."""

    @abc.abstractmethod
    def update_progress(
        self, job_id: str, step: int, total_steps: int | None, trained_tokens: int | None,
        lease: Lease | None = None,
    ) -> None: ...  # fmt: skip

    @abc.abstractmethod
    def get_adapter_job(self, tenant: str, adapter_id: str) -> JobRecord | None:
        """The job that produces adapter ``adapter_id``, if it belongs to ``tenant``."""

    # leases
    @abc.abstractmethod
    def claim_jobs(
        self, holder: str, model: str, limit: int, lease_s: float
    ) -> list[tuple[JobRecord, Lease]]:
        """Lease up to ``limit`` jobs for base model ``model`` that are queued or running and whose lease is
        free or expired, in dispatch order (``fairshare.fair_order``: weighted fair queuing over tokens
        between tenants, within each tenant's running-jobs quota; priority, then age inside a tenant); each
        grant gets the next fencing token. Two workers claiming at once never get the same job."""

    @abc.abstractmethod
    def renew_leases(self, leases: Iterable[Lease], lease_s: float) -> list[Lease]:
        """Extend the leases that are still current by ``lease_s`` from now; returns them (the others are
        lost: their jobs belong to another worker now, or finished)."""

    @abc.abstractmethod
    def release_lease(self, lease: Lease) -> bool:
        """Give a lease back before it expires (a worker stopping); False when it was no longer held."""

    @abc.abstractmethod
    def release_leases_of(self, holder: str) -> int:
        """Give back every lease ``holder`` holds (a worker restarting under the same id, once it knows its
        previous process is gone); returns how many."""

    @abc.abstractmethod
    def lease_history(self, job_id: str) -> list[LeaseGrant]:
        """Every lease ever granted on the job, by token."""

    # workers
    @abc.abstractmethod
    def heartbeat(self, rec: WorkerRecord) -> None:
        """Record a worker's announcement; ``heartbeat_at`` is the store's clock."""

    @abc.abstractmethod
    def list_workers(self) -> list[WorkerRecord]:
        """Every worker that ever announced itself, newest heartbeat first."""

    @abc.abstractmethod
    def now(self) -> float:
        """The store's clock (seconds since the epoch): leases and heartbeats are measured on it."""

    # events and checkpoints
    @abc.abstractmethod
    def add_events(self, events: list[EventRecord], lease: Lease | None = None) -> None:
        """Append events, each under a new id larger than every earlier one of the job: the list is
        append-only, an event keeps its id and its place. The one update: a ``metrics`` event for a job and
        step that already has one (a job resumed from a checkpoint trains those steps again) rewrites that
        event's message, data and lease token in place (same id, same place), so each step has exactly one;
        the other events of the run that was cut short stay (a step evaluated again gets a new validation
        event after the old one).
        With ``lease``: every event is for its job, written with its token, or ``LeaseLost``."""

    @abc.abstractmethod
    def list_events(
        self, job_id: str, after: int | None, limit: int, ascending: bool
    ) -> tuple[list[EventRecord], bool]: ...

    @abc.abstractmethod
    def add_checkpoint(self, rec: CheckpointRecord, lease: Lease | None = None) -> None:
        """Record a checkpoint; one per (job, step), a later one for the same step replaces it."""

    @abc.abstractmethod
    def list_checkpoints(
        self, job_id: str, after: int | None, limit: int
    ) -> tuple[list[CheckpointRecord], bool]:
        """Newest first."""

    # tenants: weights and quotas
    @abc.abstractmethod
    def set_tenant(self, rec: TenantRecord) -> None: ...

    @abc.abstractmethod
    def get_tenant(self, tenant: str) -> TenantRecord:
        """The tenant's settings (the defaults for a tenant never set)."""

    @abc.abstractmethod
    def list_tenants(self) -> list[TenantRecord]:
        """Every tenant that was set or holds a token."""

    # small key-value state
    @abc.abstractmethod
    def set_meta(self, key: str, value: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def get_meta(self, key: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    def schema_version(self) -> int:
        """The migration the database is at."""

    def close(self) -> None:  # noqa: B027 - optional: only pooled stores hold resources
        """Release connections."""
