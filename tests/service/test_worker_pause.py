"""Pause and resume under leases, driven through the worker's own loop steps: a paused job leaves its worker
at its next checkpoint and gives its lease back; nobody claims it while paused; after resume another
worker claims it with a new fencing token and finishes it from that checkpoint, each step reported once."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from helpers.service import ROWS, jsonl, upload
from lorafleet.service import auth
from lorafleet.service.app import ServiceSettings, create_app
from lorafleet.service.files import DataDir
from lorafleet.service.jobspec import EngineSettings
from lorafleet.service.worker import Worker


def _drive(worker: Worker, until, timeout: float = 120.0) -> None:
    """The worker's loop body (sync, one micro-batch, paused jobs leaving) until ``until()``."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the worker did not get there in time"
        worker.sync()
        worker._drop_lost()
        worker._step()
        worker._leave_paused()


def test_paused_job_leaves_at_its_checkpoint_releases_its_lease_and_resumes_on_another_worker(
    tmp_path, tiny_llama_dir
):
    app = create_app(ServiceSettings(tmp_path / "data", str(tiny_llama_dir)))
    store, dd = app.state.store, DataDir(tmp_path / "data")
    _, secret = auth.create_token(store, "alice")
    h = {"Authorization": f"Bearer {secret}"}
    settings = EngineSettings(base_model=str(tiny_llama_dir))
    w1 = Worker(store, dd, settings, 0.0, worker_id="w1", lease_s=60.0, serve_inference=False)
    w2 = Worker(store, dd, settings, 0.0, worker_id="w2", lease_s=60.0, serve_inference=False)
    w1._load_engine()
    w2._load_engine()
    with TestClient(app) as client:
        fid = upload(client, h, jsonl(ROWS)).json()["id"]
        tr = {"max_steps": 6, "save_every_steps": 2, "max_seq_len": 32}
        body = {"training_file": fid, "hyperparameters": {"batch_size": 2}, "lorafleet": {"training": tr}}
        jid = client.post("/v1/fine_tuning/jobs", headers=h, json=body).json()["id"]

        _drive(w1, lambda: store.get_job_any(jid).step >= 1)
        assert store.get_job_any(jid).step == 1  # between two checkpoints
        # paused and resumed before its next checkpoint: it trains on where it is, under the same lease
        assert client.post(f"/v1/fine_tuning/jobs/{jid}/pause", headers=h).json()["status"] == "paused"
        w1.sync()
        assert client.post(f"/v1/fine_tuning/jobs/{jid}/resume", headers=h).json()["status"] == "queued"
        w1.sync()
        assert w1.leases.get(jid) is not None and not w1._pausing
        assert store.get_job_any(jid).status == "running"
        assert client.post(f"/v1/fine_tuning/jobs/{jid}/pause", headers=h).json()["status"] == "paused"
        _drive(w1, lambda: w1.leases.get(jid) is None)
        job = store.get_job_any(jid)
        assert (job.status, job.step) == ("paused", 2)  # it trained on to its next checkpoint, then left
        assert [c.step for c in store.list_checkpoints(jid, None, 10)[0]] == [2]
        [grant] = store.lease_history(jid)
        assert (grant.holder, grant.released_at is not None) == ("w1", True)
        # nobody claims a paused job
        w2.sync()
        assert len(w2.leases) == 0 and store.get_job_any(jid).step == 2

        assert client.post(f"/v1/fine_tuning/jobs/{jid}/resume", headers=h).json()["status"] == "queued"
        _drive(w2, lambda: store.get_job_any(jid).status in ("succeeded", "failed"))
        w1.sync()  # w1 never takes it back
        assert store.get_job_any(jid).status == "succeeded", store.get_job_any(jid).error
        assert [(g.token, g.holder) for g in store.lease_history(jid)] == [(1, "w1"), (2, "w2")]
        events, _ = store.list_events(jid, None, 100, ascending=True)
        steps = [(e.step, e.lease_token) for e in events if e.type == "metrics"]
        assert steps == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 2), (6, 2)]  # each step once, by its holder
        messages = [e.message for e in events]
        assert "Paused at step 2; resume continues from there" in messages
        assert "Resumed from the checkpoint at step 2 of 6" in messages
