"""Versioned schema migrations, one list for both databases.

Each migration is a version number and its statements, written once with a few type placeholders that each
dialect fills in (``{id}``: an auto-numbered primary key, ``{int}``: a 64-bit integer, ``{real}``: a double,
``{spec_model}``: the ``model`` field of a job's JSON ``spec``). ``schema_migrations`` records the versions
applied; a store applies the missing ones in order, in one transaction each, under a lock (SQLite's write
lock, PostgreSQL's advisory lock) so that API processes and workers starting together apply each once.
Migration 1 is the schema from before versioning (``IF NOT EXISTS``), so an existing ``lorafleet.db``
upgrades in place. Never edit a released migration: add the next one.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MIGRATIONS", "Dialect", "Migration", "latest_version"]


@dataclass(frozen=True)
class Dialect:
    """How one database spells the placeholders of the migrations."""

    id: str
    int: str
    real: str
    spec_model: str

    def render(self, statement: str) -> str:
        return statement.format(id=self.id, int=self.int, real=self.real, spec_model=self.spec_model)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "tokens, files, jobs, events, checkpoints, meta",
        (
            """CREATE TABLE IF NOT EXISTS tokens (
                id TEXT PRIMARY KEY, tenant TEXT NOT NULL, token_hash TEXT NOT NULL UNIQUE,
                created_at {real} NOT NULL, revoked_at {real})""",
            """CREATE TABLE IF NOT EXISTS files (
                seq {id}, id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL, filename TEXT NOT NULL,
                purpose TEXT NOT NULL, bytes {int} NOT NULL, num_rows {int} NOT NULL, format TEXT NOT NULL,
                created_at {real} NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS files_tenant ON files(tenant, seq)",
            """CREATE TABLE IF NOT EXISTS jobs (
                seq {id}, id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL, status TEXT NOT NULL,
                spec TEXT NOT NULL, adapter_id TEXT NOT NULL UNIQUE, priority {int} NOT NULL,
                created_at {real} NOT NULL, started_at {real}, finished_at {real}, error TEXT,
                step {int} NOT NULL, total_steps {int}, trained_tokens {int} NOT NULL,
                updated_at {real} NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs(tenant, seq)",
            "CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status)",
            "CREATE TABLE IF NOT EXISTS job_files (job_id TEXT NOT NULL, file_id TEXT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS job_files_file ON job_files(file_id)",
            """CREATE TABLE IF NOT EXISTS events (
                seq {id}, job_id TEXT NOT NULL, type TEXT NOT NULL, level TEXT NOT NULL,
                message TEXT NOT NULL, step {int}, data TEXT NOT NULL, created_at {real} NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq)",
            "CREATE UNIQUE INDEX IF NOT EXISTS events_metrics ON events(job_id, step) WHERE type = 'metrics'",
            """CREATE TABLE IF NOT EXISTS checkpoints (
                seq {id}, job_id TEXT NOT NULL, step {int} NOT NULL, path TEXT NOT NULL,
                metrics TEXT NOT NULL, created_at {real} NOT NULL, UNIQUE(job_id, step))""",
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        ),
    ),
    Migration(
        2,
        "leases with fencing tokens, the lease history, workers, the job's base model",
        (
            "ALTER TABLE jobs ADD COLUMN model TEXT NOT NULL DEFAULT ''",
            "UPDATE jobs SET model = COALESCE({spec_model}, '')",
            "ALTER TABLE jobs ADD COLUMN lease_holder TEXT",
            "ALTER TABLE jobs ADD COLUMN lease_expires {real}",
            "ALTER TABLE jobs ADD COLUMN lease_token {int} NOT NULL DEFAULT 0",
            "CREATE INDEX jobs_claim ON jobs(status, model)",
            "ALTER TABLE events ADD COLUMN lease_token {int} NOT NULL DEFAULT 0",
            """CREATE TABLE leases (
                job_id TEXT NOT NULL, token {int} NOT NULL, holder TEXT NOT NULL,
                granted_at {real} NOT NULL, expires_at {real} NOT NULL, released_at {real},
                PRIMARY KEY (job_id, token))""",
            """CREATE TABLE workers (
                id TEXT PRIMARY KEY, host TEXT NOT NULL, pid {int} NOT NULL, base_model TEXT NOT NULL,
                state TEXT NOT NULL, max_concurrent_tasks {int} NOT NULL,
                max_tokens_per_micro_batch {int} NOT NULL, active_jobs {int} NOT NULL, message TEXT NOT NULL,
                heartbeat_at {real} NOT NULL)""",
        ),
    ),
    Migration(
        3,
        "tenants: fair-share weights and quotas",
        (
            """CREATE TABLE tenants (
                tenant TEXT PRIMARY KEY, weight {real} NOT NULL, max_running_jobs {int},
                max_queued_jobs {int}, max_stored_bytes {int})""",
        ),
    ),
)


def latest_version() -> int:
    return MIGRATIONS[-1].version
