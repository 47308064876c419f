"""A fleet on a real PostgreSQL server, on loopback: API processes (``lorafleet serve --api-only``) and
worker processes (``lorafleet worker``) sharing one store and one data folder, driven over HTTP.

What is checked comes from the store itself (``helpers.fleet.check_store``): one metrics event per step,
fencing tokens non-decreasing over each job's events, lease grants that never overlap.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from helpers.fleet import LEASE_S, Fleet, check_store, holder
from lorafleet.service.store import open_store

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


ROWS = [{"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(24)]
HP = {"batch_size": 2, "max_steps": 40, "save_every_steps": 4, "max_seq_len": 32}


def _client(base: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def _submit(client: httpx.Client, n: int, hp=HP) -> list[str]:
    data = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    fid = client.post("/v1/files", files={"file": ("train.jsonl", data, "application/jsonl")}).json()["id"]
    ids = []
    for _ in range(n):
        training = {k: v for k, v in hp.items() if k != "batch_size"}
        body = {
            "training_file": fid,
            "hyperparameters": {"batch_size": hp["batch_size"]},
            "lorafleet": {"training": training},
        }
        r = client.post("/v1/fine_tuning/jobs", json=body)
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    return ids


@pytest.fixture()
def fleet(pg_server, tiny_llama_dir, tmp_path):
    f = Fleet(pg_server.new_database(), tiny_llama_dir, tmp_path)
    yield f
    f.stop()


def test_sigkilled_worker_jobs_finish_on_the_others_without_overlap(fleet):
    api_a, api_b = fleet.api(), fleet.api()
    w1 = fleet.worker("w1", "--max-concurrent-tasks", "2")
    fleet.wait_log(w1, "serving chat/completions")  # w1 takes the data folder's inference socket first
    tokens = {t: fleet.token(t) for t in ("alice", "bob")}
    long = {**HP, "max_steps": 8 * HP["max_steps"]}  # w1's jobs: still training once w2 is up
    jobs = _submit(_client(api_a, tokens["alice"]), 2, long)
    store = open_store(fleet.url)
    try:
        fleet.wait_until(lambda: all(holder(store, j) == "w1" for j in jobs))  # w1 trains both
        w2 = fleet.worker("w2", "--max-concurrent-tasks", "4")  # room for w1's jobs beside its own
        health = fleet.wait_ready(2)
        fleet.wait_log(w2, "another worker serves chat/completions")  # w2 trains only, while w1 lives
        assert {w["id"] for w in health["workers"]} == {"w1", "w2"}
        assert all(w["base_model"] == fleet.model.name for w in health["workers"])
        assert {w["id"]: w["max_concurrent_tasks"] for w in health["workers"]} == {"w1": 2, "w2": 4}
        for p, _ in fleet.apis:  # API processes are stateless: no model, no torch loaded
            maps = Path(f"/proc/{p.proc.pid}/maps")
            if maps.is_file():
                assert "libtorch" not in maps.read_text(), "an --api-only process loaded torch"
        jobs += _submit(_client(api_b, tokens["bob"]), 2)  # w1 is full: w2 claims these
        # kill w1 once it has trained and checkpointed some steps of a job
        fleet.wait_until(lambda: any(store.get_job_any(j).step >= 6 for j in jobs[:2]))
        mine = jobs[:2]
        killed_at = time.monotonic()
        fleet.workers["w1"].proc.send_signal(signal.SIGKILL)
        fleet.workers["w1"].proc.wait()
        at_kill = {j: store.get_job_any(j) for j in mine}  # the steps the store holds of w1's jobs
        orphans = [j for j, rec in at_kill.items() if rec.status != "succeeded"]
        assert orphans
        # the orphans are claimed by w2 within the lease expiry (plus its poll), and resumed
        while time.monotonic() < killed_at + 120 and any(holder(store, j) != "w2" for j in orphans):
            time.sleep(0.05)
        took_over_s = time.monotonic() - killed_at
        assert took_over_s < LEASE_S + 2.0, (took_over_s, fleet.tails())
        # and w2 took over inference: completions answer through either API
        fleet.wait_log(w2, "this one serves them now", timeout=10)
        for base in (api_a, api_b):
            r = _client(base, tokens["alice"]).post(
                "/v1/completions", json={"model": fleet.model.name, "prompt": "hello", "max_tokens": 2}
            )
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
        # every job succeeds, through either API
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if all(store.get_job_any(j).status in ("succeeded", "failed", "cancelled") for j in jobs):
                break
            time.sleep(0.2)
        steps = {j: (long if j in mine else HP)["max_steps"] for j in jobs}
        holders = check_store(store, jobs, steps)
        lost = {}
        for j in orphans:
            assert holders[j][0] == "w1" and holders[j][-1] == "w2", holders[j]
            events, _ = store.list_events(j, None, 1000, ascending=True)
            resumed = [
                e.message for e in events if e.message.startswith("Resumed from the checkpoint at step")
            ]
            assert len(resumed) == 1, resumed
            # at most one checkpoint period is trained again: w2 went on from w1's last checkpoint
            ckpt = int(resumed[0].split()[6])
            assert at_kill[j].step - HP["save_every_steps"] <= ckpt <= at_kill[j].step, (
                resumed,
                at_kill[j].step,
            )
            lost[j] = at_kill[j].step - ckpt
        for base, token in ((api_a, tokens["bob"]), (api_b, tokens["alice"])):
            listed = _client(base, token).get("/v1/fine_tuning/jobs").json()["data"]
            assert {j["status"] for j in listed} == {"succeeded"} and len(listed) == 2
        print(
            f"fleet: w1 SIGKILLed at steps {sorted(r.step for r in at_kill.values())} of {long['max_steps']}; "
            f"w2 took over its {len(orphans)} job(s) after {took_over_s:.1f} s and trained "
            f"{sorted(lost.values())} step(s) again (checkpoint period {HP['save_every_steps']})"
        )
    finally:
        store.close()


def test_postgres_restart_mid_run_answers_503_then_everything_finishes(tiny_llama_dir, tmp_path):
    from helpers.pgserver import PostgresServer

    pg = PostgresServer()  # its own server: this test stops it
    pg.start()
    fleet = Fleet(pg.new_database(), tiny_llama_dir, tmp_path)
    store = None
    try:
        api = fleet.api()
        fleet.worker("w1", "--max-concurrent-tasks", "4")
        fleet.wait_ready(1)
        alice = _client(api, fleet.token("alice"))
        jobs = _submit(alice, 2, {**HP, "max_steps": 60})
        store = open_store(fleet.url)
        deadline = time.monotonic() + 240
        while not all(store.get_job_any(j).step >= 5 for j in jobs) and time.monotonic() < deadline:
            time.sleep(0.05)
        store.close()
        pg.stop()
        statuses, retry_after, latencies = [], set(), []
        down_until = time.monotonic() + 2 * LEASE_S  # long enough for the worker to drop its leases
        while time.monotonic() < down_until:
            for path in ("/v1/fine_tuning/jobs", f"/v1/fine_tuning/jobs/{jobs[0]}", "/healthz"):
                tic = time.monotonic()
                r = alice.get(path)
                latencies.append(time.monotonic() - tic)
                statuses.append(r.status_code)
                if r.status_code == 503:
                    retry_after.add(r.headers.get("retry-after"))
                    assert "store" in r.json()["error"]["message"]
        assert set(statuses) == {503}, statuses  # never a 500, never a hang
        assert retry_after and all(v and v.isdigit() for v in retry_after)
        pg.start()
        # the API answers again and the worker goes on: every acknowledged job finishes
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            r = alice.get("/v1/fine_tuning/jobs")
            if r.status_code == 200 and {j["status"] for j in r.json()["data"]} == {"succeeded"}:
                break
            assert r.status_code in (200, 503), r.text
            time.sleep(0.2)
        store = open_store(fleet.url)
        holders = check_store(store, jobs, 60)
        print(
            f"postgres restart: {len(statuses)} requests while down, all 503, answered in "
            f"{', '.join(f'{x:.2f}' for x in latencies)} s; "
            f"holders {holders}"
        )
    finally:
        if store is not None:
            store.close()
        fleet.stop()
        pg.cleanup()
