"""Fair share on real workers (real training, no simulation), on a real PostgreSQL server on loopback: 2
workers of 2 slots each over one store, tenant ``a`` (weight 1) queues 10 jobs and holds every slot, then
tenant ``b`` (weight 3, set with ``lorafleet tenants set``) submits 1 job, then a backlog. While shares are measured
both tenants keep a backlog (each tops its queue up to ``BACKLOG`` queued jobs as jobs start), as tenants
with standing work do; so the window is the same whatever the machine's speed.

Checked: ``b``'s first job is granted before any other of its jobs and at the first claim after its submission (no job of ``a`` is granted in
between); over the next ``WINDOW_S`` seconds, while both tenants still have jobs queued, ``b`` trains 75%
+- 7.5% of the tokens (its weight 3 of 4, within 10% of it), measured from the jobs' trained tokens in the
store. An over-quota request (``lorafleet tenants set a --max-queued-jobs N``) is a 429 with Retry-After
naming the quota, through the ``openai`` SDK, and creates nothing.
"""

from __future__ import annotations

import json
import os
import time

import openai
import pytest

from helpers.fleet import Fleet
from lorafleet.service.store import open_store

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WINDOW_S = float(os.environ.get("LORAFLEET_FAIRSHARE_WINDOW_S", "60"))
STEPS = 100  # per job: slots turn over a few times per window (about 20 s a job on the 2-core machine)
BACKLOG = 6  # queued jobs a tenant keeps: more than the 4 slots, so no claim round empties it
ROWS = [{"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(16)]
JOB = {
    "hyperparameters": {"batch_size": 2},
    "extra_body": {
        "lorafleet": {"adapter": {"rank": 4}, "training": {"max_steps": STEPS, "max_seq_len": 24}}
    },
}


def _tokens(store, ids) -> dict[str, int]:
    out: dict[str, int] = {}
    for jid in ids:
        j = store.get_job_any(jid)
        out[j.tenant] = out.get(j.tenant, 0) + (j.trained_tokens or 0)
    return out


def test_weighted_fair_share_on_real_workers(pg_server, tiny_llama_dir, tmp_path):
    fleet = Fleet(pg_server.new_database(), tiny_llama_dir, tmp_path)
    store = open_store(fleet.url)
    try:
        api = fleet.api()
        fleet.worker("w1", "--max-concurrent-tasks", "2", lease_s=20.0)
        fleet.worker("w2", "--max-concurrent-tasks", "2", "--no-inference", lease_s=20.0)
        secrets = {t: fleet.token(t) for t in ("a", "b")}
        fleet.cli("tenants", "set", "b", "--weight", "3", "--store", fleet.url)
        fleet.wait_ready(2)
        sdk = {t: openai.OpenAI(base_url=f"{api}/v1", api_key=s, max_retries=0) for t, s in secrets.items()}
        data = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
        fid = {t: c.files.create(file=("train.jsonl", data), purpose="fine-tune").id for t, c in sdk.items()}

        def submit(t: str):
            return sdk[t].fine_tuning.jobs.create(model=fleet.model.name, training_file=fid[t], **JOB).id

        a_jobs = [submit("a") for _ in range(10)]
        deadline = time.monotonic() + 120
        while sum(store.get_job_any(j).step >= 1 for j in a_jobs) < 4:  # a holds every slot
            assert time.monotonic() < deadline, fleet.tails()
            time.sleep(0.1)
        # a's queued-jobs quota, at what it has queued now: one more is a 429 that creates nothing
        queued = sum(store.get_job_any(j).status in ("validating_files", "queued") for j in a_jobs)
        fleet.cli("tenants", "set", "a", "--max-queued-jobs", str(queued), "--store", fleet.url)
        with pytest.raises(openai.RateLimitError) as e:
            submit("a")
        assert "max_queued_jobs" in str(e.value) and int(e.value.response.headers["retry-after"]) > 0
        assert len(sdk["a"].fine_tuning.jobs.list(limit=100).data) == 10
        fleet.cli("tenants", "set", "a", "--max-queued-jobs", "none", "--store", fleet.url)

        submitted_at = time.time()
        b_jobs = [submit("b")]  # b submits 1 job, then its backlog
        b_jobs += [submit("b") for _ in range(BACKLOG)]
        all_jobs = a_jobs + b_jobs
        deadline = time.monotonic() + 300
        while not any(store.lease_history(j) for j in b_jobs):
            assert time.monotonic() < deadline, fleet.tails()
            time.sleep(0.05)
        start = _tokens(store, all_jobs)
        t_start = time.monotonic()
        first_b = min(g.granted_at for j in b_jobs for g in store.lease_history(j))
        a_between = [
            g for j in a_jobs for g in store.lease_history(j) if submitted_at < g.granted_at < first_b
        ]
        assert not a_between, a_between  # b's job starts at the first claim after it arrived
        assert store.lease_history(b_jobs[0])[0].granted_at == first_b  # its first job first
        mine = {"a": a_jobs, "b": b_jobs}
        while time.monotonic() < t_start + WINDOW_S:  # both keep work queued: the shares mean something
            for t, ids in mine.items():
                queued = sum(store.get_job_any(j).status in ("validating_files", "queued") for j in ids)
                assert queued > 0, (t, fleet.tails())  # never ran dry between two top-ups
                ids += [submit(t) for _ in range(BACKLOG - queued)]
            time.sleep(0.5)
        all_jobs = a_jobs + b_jobs
        end = _tokens(store, all_jobs)
        window = time.monotonic() - t_start
        got = {t: end.get(t, 0) - start.get(t, 0) for t in ("a", "b")}
        share_b = got["b"] / (got["a"] + got["b"])
        print(
            f"fair share on real workers: b (weight 3 of 4) trained {share_b:.1%} of the tokens in {window:.0f} s "
            f"({got}; {len(all_jobs)} jobs submitted); b's first job granted {first_b - submitted_at:.1f} s after it was submitted, at the "
            f"first claim"
        )
        assert abs(share_b - 0.75) <= 0.075, got
    finally:
        store.close()
        fleet.stop()
