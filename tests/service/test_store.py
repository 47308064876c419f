"""The store, on both backends: SQLite and a real PostgreSQL server (the ``store`` fixture runs each test
once per backend). Expected answers come from the records the test wrote; concurrency is checked with
real threads (and, in ``test_fleet.py``, real worker processes)."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time

import pytest

from lorafleet.service import auth
from lorafleet.service.store import (
    EventRecord,
    JobRecord,
    LeaseLost,
    SQLiteStore,
    WorkerRecord,
    open_store,
)
from lorafleet.service.store.migrations import MIGRATIONS, latest_version


def _job(i: int, tenant: str, status="queued", priority=0, model="m") -> JobRecord:
    return JobRecord(
        id=f"ftjob-{i:024x}", tenant=tenant, status=status, spec={"training_file": None, "model": model},
        adapter_id=f"adapter-{i:016x}", created_at=time.time(), priority=priority,
    )  # fmt: skip


def _dump(store) -> str:
    """Every row of every table, as text, read past the store's own code."""
    if isinstance(store, SQLiteStore):
        return "\n".join(sqlite3.connect(store.path).iterdump())
    import psycopg

    out = []
    with psycopg.connect(store.url) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
        for (t,) in tables:
            out += [repr(r) for r in conn.execute(f'SELECT * FROM "{t}"').fetchall()]
    return "\n".join(out)


def test_store_pagination_isolation_and_compare_and_set(store):
    for i in range(7):
        store.add_job(_job(i, "alice" if i % 2 == 0 else "bob", priority=i % 3))
    # newest first, in pages of 2, only alice's (ids 6, 4, 2, 0)
    seen, after = [], None
    while True:
        page, more = store.list_jobs("alice", after, 2)
        seen += [j.id for j in page]
        if not more:
            break
        after = page[-1].id
    assert seen == [f"ftjob-{i:024x}" for i in (6, 4, 2, 0)]
    assert store.get_job("bob", f"ftjob-{0:024x}") is None  # alice's job is invisible to bob
    assert store.list_jobs("bob", f"ftjob-{6:024x}", 10) == ([], False)  # another tenant's cursor: nothing
    # priority high first, then oldest first
    assert [j.id[-1] for j in store.jobs_with_status(["queued"])] == ["2", "5", "1", "4", "0", "3", "6"]
    assert store.jobs_with_status(["queued"], model="other") == []
    # compare-and-set: only from the allowed statuses
    jid = f"ftjob-{1:024x}"
    assert store.transition(jid, "cancelled", ["queued", "running"], finished_at=1.0)
    assert not store.transition(jid, "running", ["queued"])
    assert store.get_job_any(jid).status == "cancelled"
    with pytest.raises(ValueError, match="unknown job status"):
        store.transition(jid, "sleeping", ["queued"])


def test_store_metrics_event_replaced_on_resume(store):
    jid = f"ftjob-{1:024x}"
    ev = lambda step, loss: EventRecord(jid, "metrics", "m", 0.0, step=step, data={"train_loss": loss})  # noqa: E731
    store.add_events([ev(1, 3.0), ev(2, 2.5), ev(3, 2.0)])
    store.add_events([ev(3, 1.9), ev(4, 1.5)])  # resumed at step 2: step 3 trained again
    events, more = store.list_events(jid, None, 100, ascending=True)
    assert not more
    assert [(e.step, e.data["train_loss"]) for e in events] == [(1, 3.0), (2, 2.5), (3, 1.9), (4, 1.5)]
    page, more = store.list_events(jid, None, 2, ascending=False)
    assert [e.step for e in page] == [4, 3] and more


def test_tokens_are_stored_hashed(store):
    rec, secret = auth.create_token(store, "team-a")
    assert rec.token_hash == hashlib.sha256(secret.encode()).hexdigest()
    dump = _dump(store)
    assert secret not in dump and rec.token_hash in dump
    assert auth.authenticate(store, f"Bearer {secret}") == "team-a"
    assert store.revoke_token(rec.id)
    with pytest.raises(auth.AuthError, match="revoked"):
        auth.authenticate(store, f"Bearer {secret}")
    with pytest.raises(ValueError, match="not a valid name"):
        auth.create_token(store, "../etc")


def test_schema_is_migrated_once_to_the_latest_version(store_url):
    a = open_store(store_url)
    b = open_store(store_url)  # a second process opening the same store applies nothing again
    assert a.schema_version() == b.schema_version() == latest_version() == MIGRATIONS[-1].version
    a.add_job(_job(1, "alice"))
    assert b.get_job_any(f"ftjob-{1:024x}").tenant == "alice"
    a.close()
    b.close()


def test_processes_opening_a_new_store_together_migrate_it_once(store_url):
    # API processes and workers of a fleet start together on an empty database
    opened, errors = [], []

    def open_one() -> None:
        try:
            opened.append(open_store(store_url))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert {s.schema_version() for s in opened} == {latest_version()}
    for s in opened:
        s.close()


def test_pre_versioning_sqlite_file_upgrades_in_place(tmp_path):
    # the schema as lorafleet wrote it before migrations existed (migration 1's tables), with a job in it
    db = tmp_path / "lorafleet.db"
    conn = sqlite3.connect(db)
    for statement in MIGRATIONS[0].statements:
        conn.execute(SQLiteStore.DIALECT.render(statement))
    conn.execute(
        "INSERT INTO jobs (id, tenant, status, spec, adapter_id, priority, created_at, step, trained_tokens, "
        "updated_at) VALUES ('ftjob-old', 'alice', 'queued', '{\"model\": \"tiny\"}', 'adapter-old', 0, 1.0, "
        "0, 0, 1.0)"
    )
    conn.commit()
    conn.close()
    store = open_store(f"sqlite:///{db}")
    assert store.schema_version() == latest_version()
    # the job's base model was filled from its spec, so a worker for that model can claim it
    [(job, lease)] = store.claim_jobs("w1", "tiny", 5, 30.0)
    assert job.id == "ftjob-old" and lease.token == 1


def test_bad_store_urls_say_what_is_accepted():
    for url in ("mysql://x/y", "sqlite://relative.db", "sqlite:///", "/tmp/x.db"):
        with pytest.raises(ValueError, match="sqlite:///PATH or postgresql://"):
            open_store(url)


# -- leases -----------------------------------------------------------------------------------------------


def test_claims_are_exclusive_and_follow_placement_and_priority(store):
    for i in range(4):
        store.add_job(_job(i, "alice", priority=1 if i == 3 else 0))
    store.add_job(_job(9, "bob", model="other"))
    store.add_job(_job(8, "bob", status="validating_files"))
    got = store.claim_jobs("w1", "m", 2, 30.0)
    assert [j.id[-1] for j, _ in got] == ["3", "0"]  # priority first, then age
    assert all(lease.holder == "w1" and lease.token == 1 for _, lease in got)
    assert all(lease.expires_at > store.now() + 20 for _, lease in got)
    rest = store.claim_jobs("w2", "m", 10, 30.0)
    assert [j.id[-1] for j, _ in rest] == ["1", "2"]  # never a leased job, never another model's
    assert store.claim_jobs("w3", "m", 10, 30.0) == []
    assert [j.id[-1] for j, _ in store.claim_jobs("w3", "other", 10, 30.0)] == ["9"]


def test_expired_lease_is_claimed_again_with_a_new_token_and_the_old_holder_is_fenced(store):
    jid = f"ftjob-{1:024x}"
    store.add_job(_job(1, "alice"))
    [(_, old)] = store.claim_jobs("w1", "m", 1, 0.2)
    store.add_events([EventRecord(jid, "metrics", "step 1", 0.0, step=1)], lease=old)
    assert store.renew_leases([old], 0.2) and store.claim_jobs("w2", "m", 1, 30.0) == []
    time.sleep(0.4)  # w1 stops renewing: its lease expires
    [(_, new)] = store.claim_jobs("w2", "m", 1, 30.0)
    assert (new.holder, new.token) == ("w2", old.token + 1)
    # every write of the old holder is refused, and changes nothing
    with pytest.raises(LeaseLost):
        store.add_events([EventRecord(jid, "metrics", "step 2 (stale)", 0.0, step=2)], lease=old)
    with pytest.raises(LeaseLost):
        store.update_progress(jid, 2, 10, 100, lease=old)
    with pytest.raises(LeaseLost):
        store.transition(jid, "succeeded", ["queued", "running"], lease=old)
    from lorafleet.service.store import CheckpointRecord

    with pytest.raises(LeaseLost):
        store.add_checkpoint(CheckpointRecord(jid, 2, "/x", 0.0), lease=old)
    assert store.renew_leases([old], 30.0) == []
    assert not store.release_lease(old)
    # the new holder writes; the job's events carry the token of their writer
    store.add_events([EventRecord(jid, "metrics", "step 2", 0.0, step=2)], lease=new)
    store.update_progress(jid, 2, 10, 100, lease=new)
    events, _ = store.list_events(jid, None, 10, ascending=True)
    assert [(e.step, e.lease_token) for e in events] == [(1, 1), (2, 2)]
    assert store.list_checkpoints(jid, None, 10) == ([], False)
    assert store.get_job_any(jid).step == 2
    # a terminal status releases the lease; the history shows the two grants, the first one expired
    assert store.transition(jid, "succeeded", ["queued", "running"], lease=new, finished_at=1.0)
    history = store.lease_history(jid)
    assert [(g.token, g.holder) for g in history] == [(1, "w1"), (2, "w2")]
    assert history[0].released_at is None and history[1].released_at is not None
    assert history[1].granted_at >= history[0].expires_at  # granted only after the first expired
    assert store.claim_jobs("w3", "m", 1, 30.0) == []


def test_released_lease_is_claimable_at_once(store):
    store.add_job(_job(1, "alice"))
    [(_, lease)] = store.claim_jobs("w1", "m", 1, 30.0)
    assert store.release_lease(lease)
    [(_, again)] = store.claim_jobs("w2", "m", 1, 30.0)
    assert again.token == lease.token + 1
    # a worker restarted under its id gives back what its previous process held
    store.add_job(_job(2, "alice"))
    store.claim_jobs("w2", "m", 5, 30.0)
    assert store.release_leases_of("w2") == 2 and store.release_leases_of("w2") == 0
    assert [lease.token for _, lease in store.claim_jobs("w3", "m", 5, 30.0)] == [3, 2]
    history = store.lease_history(f"ftjob-{1:024x}")
    assert [g.released_at is not None for g in history] == [True, True, False]  # w3 holds token 3


def test_a_paused_job_keeps_its_lease_until_released_and_is_claimed_only_after_resume(store):
    jid = f"ftjob-{1:024x}"
    store.add_job(_job(1, "alice"))
    [(_, lease)] = store.claim_jobs("w1", "m", 1, 0.3)
    assert store.transition(jid, "paused", ["queued", "running"])  # the API pauses it
    # the holder still renews and writes (its pause checkpoint); nobody claims a paused job
    assert [x.token for x in store.renew_leases([lease], 30.0)] == [lease.token]
    time.sleep(0.4)  # past the first expiry: the renewal held it
    assert store.claim_jobs("w2", "m", 1, 30.0) == []
    store.add_events([EventRecord(jid, "metrics", "step 3", 0.0, step=3)], lease=lease)
    assert store.claim_jobs("w2", "m", 1, 30.0) == []
    assert store.release_lease(lease)  # the worker let it go after its last checkpoint
    assert store.claim_jobs("w2", "m", 1, 30.0) == []  # still paused
    assert store.transition(jid, "queued", ["paused"])  # resume
    [(job, again)] = store.claim_jobs("w2", "m", 1, 30.0)
    assert job.id == jid and again.token == lease.token + 1
    assert store.renew_leases([lease], 30.0) == []  # the old holder is fenced off


def test_concurrent_claims_never_share_a_job(store):
    n_jobs, n_threads = 24, 6
    for i in range(n_jobs):
        store.add_job(_job(i, "alice"))
    got: dict[str, list[str]] = {}
    errors = []

    def claim(name: str) -> None:
        try:
            mine = []
            while True:
                batch = store.claim_jobs(name, "m", 2, 30.0)
                if not batch:
                    break
                mine += [j.id for j, _ in batch]
            got[name] = mine
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=claim, args=(f"w{k}",)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    claimed = [j for ids in got.values() for j in ids]
    assert sorted(claimed) == sorted(f"ftjob-{i:024x}" for i in range(n_jobs))  # each job exactly once


def test_workers_announce_themselves(store):
    rec = WorkerRecord("w1", "host-a", 123, "tiny", "ready", 8, 4096, active_jobs=2)
    store.heartbeat(rec)
    before = store.now()
    time.sleep(0.05)
    store.heartbeat(WorkerRecord("w1", "host-a", 123, "tiny", "ready", 8, 4096, active_jobs=3))
    store.heartbeat(WorkerRecord("w2", "host-b", 7, "other", "loading", 4, 1024))
    workers = {w.id: w for w in store.list_workers()}
    assert set(workers) == {"w1", "w2"}
    assert workers["w1"].active_jobs == 3 and workers["w1"].heartbeat_at > before
    assert workers["w2"].base_model == "other"


# -- fair share and quotas --------------------------------------------------------------------------------


def _train(store, held: dict, tokens_per_round: int, job_tokens: int) -> dict[str, int]:
    """One round of simulated training: every held job trains ``tokens_per_round`` tokens (recorded under
    its lease, as a worker does); a job that reached ``job_tokens`` succeeds. Returns tokens per tenant."""
    got: dict[str, int] = {}
    for jid, (job, lease) in list(held.items()):
        done = store.get_job_any(jid).trained_tokens + tokens_per_round
        store.update_progress(jid, done // tokens_per_round, None, done, lease=lease)
        got[job.tenant] = got.get(job.tenant, 0) + tokens_per_round
        if done >= job_tokens:
            assert store.transition(jid, "succeeded", ["queued", "running"], lease=lease, finished_at=1.0)
            del held[jid]
    return got


def test_fair_share_new_tenant_starts_at_the_next_claim_and_shares_follow_weights(store):
    from lorafleet.service.store import TenantRecord

    store.set_tenant(TenantRecord("b", weight=3.0))
    for i in range(10):
        store.add_job(_job(i, "a"))
    held = {j.id: (j, lease) for j, lease in store.claim_jobs("w", "m", 4, 60.0)}
    assert {j.tenant for j, _ in held.values()} == {"a"}
    for _ in range(3):
        _train(store, held, 100, 400)  # a trains alone for a while; the slots stay full
    for i in range(10, 22):
        store.add_job(_job(i, "b"))
    # b's first job starts in the very next dispatch round (the first slot that frees)
    tokens = {"a": 0, "b": 0}
    first_b_round = None
    for rnd in range(40):
        free = 4 - len(held)
        for j, lease in store.claim_jobs("w", "m", free, 60.0):
            held[j.id] = (j, lease)
            if j.tenant == "b" and first_b_round is None:
                first_b_round = rnd
        waiting = {j.tenant for j in store.jobs_with_status(["queued"]) if j.id not in held}
        if rnd > 0 and not ({"a", "b"} <= waiting):
            break  # one tenant ran out of work: shares are only meaningful while both have jobs queued
        for t, n in _train(store, held, 100, 400).items():
            tokens[t] += n if rnd > 0 else 0
    # round 0 trains a's last 100 tokens, freeing every slot; the next claim already serves b
    assert first_b_round == 1, tokens
    share_b = tokens["b"] / (tokens["a"] + tokens["b"])
    assert abs(share_b - 0.75) <= 0.075, tokens  # b's weight is 3 of 4: within 10% of it
    print(f"fair share: b (weight 3 of 4) trained {share_b:.1%} of the tokens while both had work: {tokens}")


def test_quotas(store):
    from lorafleet.service.store import FileRecord, QuotaExceeded, TenantRecord

    store.set_tenant(TenantRecord("a", max_queued_jobs=2, max_running_jobs=1, max_stored_bytes=100))
    store.add_job(_job(1, "a"))
    store.add_job(_job(2, "a"))
    with pytest.raises(QuotaExceeded, match="max_queued_jobs") as e:
        store.add_job(_job(3, "a"))
    assert (e.value.quota, e.value.limit, e.value.used) == ("max_queued_jobs", 2, 2)
    store.add_job(_job(4, "b"))  # other tenants are not limited
    # running: only one of a's jobs is leased at a time, however many slots a worker has
    got = store.claim_jobs("w", "m", 10, 60.0)
    assert sorted(j.tenant for j, _ in got) == ["a", "b"]
    assert store.claim_jobs("w2", "m", 10, 60.0) == []
    store.add_job(_job(5, "a"))  # a leased job no longer counts as queued
    f = lambda i, n: FileRecord(f"file-{i:024x}", "a", "x.jsonl", "fine-tune", n, 1, "prompt_completion", 0.0)  # noqa: E731
    store.add_file(f(1, 60))
    with pytest.raises(QuotaExceeded, match="max_stored_bytes"):
        store.add_file(f(2, 41))
    store.add_file(f(3, 40))
    with pytest.raises(ValueError, match="--weight must be > 0"):
        store.set_tenant(TenantRecord("a", weight=0))
    assert [t.tenant for t in store.list_tenants()] == ["a"]
