"""The service's durable state: tenants, tokens, files, jobs, leases, workers, events and checkpoints.

``Store`` (``base``) is the interface the API processes and the workers use; ``open_store`` picks the
backend from a URL:

- ``sqlite:///PATH`` (``SQLiteStore``): the embedded default, ``DATA_DIR/lorafleet.db``; one machine;
- ``postgresql://user[:password]@host[:port]/db`` (``PostgresStore``): a fleet of API processes and workers
  on many machines.

Every write that the API acknowledges is committed before the response is sent, so a SIGKILL of any
process loses nothing acknowledged. Job status changes are compare-and-set (``transition``): the API may
cancel a job while a worker reports it running, and whichever lands second sees that the job is already
terminal and changes nothing. Workers write under leases with fencing tokens (see ``base``).
"""

from __future__ import annotations

from pathlib import Path

from .base import (
    ACTIVE_STATUSES,
    CLAIMABLE_STATUSES,
    JOB_STATUSES,
    RENEWABLE_STATUSES,
    TERMINAL_STATUSES,
    CheckpointRecord,
    EventRecord,
    FileRecord,
    JobRecord,
    Lease,
    LeaseGrant,
    LeaseLost,
    QuotaExceeded,
    Store,
    StoreUnavailable,
    TenantRecord,
    TokenRecord,
    WorkerRecord,
)
from .sqlite import SQLiteStore

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
    "SQLiteStore",
    "Store",
    "StoreUnavailable",
    "TenantRecord",
    "TokenRecord",
    "WorkerRecord",
    "default_store_url",
    "open_store",
]

_SCHEMES = "sqlite:///PATH or postgresql://user@host[:port]/db"


def default_store_url(data_dir: str | Path) -> str:
    """The embedded default: ``sqlite:///DATA_DIR/lorafleet.db``."""
    return f"sqlite:///{Path(data_dir).expanduser().resolve() / 'lorafleet.db'}"


def open_store(url: str) -> Store:
    """The store at ``url`` (``sqlite:///PATH`` or ``postgresql://...``), its schema migrated to the latest
    version. A bad URL is a ``ValueError`` that says what is accepted; an unreachable database is
    ``StoreUnavailable``."""
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if not path:
            raise ValueError(f"--store {url!r} names no file: use {_SCHEMES}")
        # sqlite:////abs/path and sqlite:///rel/path, as SQLAlchemy spells them
        return SQLiteStore(Path(path).expanduser())
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"--store {url!r} is not a store URL: use {_SCHEMES}")
