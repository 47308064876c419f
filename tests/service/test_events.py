"""A job's event list is append-only, read through the REST API while a real worker trains (driven through its
own loop steps): an event keeps its id, its place and its content once listed; a validation result is an
event of its own right after its step's metrics event; each step has exactly one metrics event; nothing of
the worker follows a cancel's "Job cancelled by the user". The store's side: a step trained again after a
resume updates its metrics event in place (same id, same place), on SQLite and PostgreSQL."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from helpers.service import ROWS, jsonl, upload
from lorafleet.service import auth
from lorafleet.service.app import ServiceSettings, create_app
from lorafleet.service.files import DataDir
from lorafleet.service.jobspec import EngineSettings
from lorafleet.service.store import EventRecord
from lorafleet.service.worker import Worker


def _loop(worker: Worker) -> None:
    worker.sync()
    worker._drop_lost()
    worker._step()


def _events(client: TestClient, h: dict, jid: str) -> list[dict]:
    """Every event, oldest first, read in pages of 3 (the paging a client follows a job with)."""
    out, after = [], None
    while True:
        q = "order=asc&limit=3" + (f"&after={after}" if after else "")
        page = client.get(f"/v1/fine_tuning/jobs/{jid}/events?{q}", headers=h).json()
        out += page["data"]
        if not page["data"]:
            return out
        after = page["data"][-1]["id"]
        if not page["has_more"]:
            return out


def _setup(tmp_path, model_dir):
    app = create_app(ServiceSettings(tmp_path / "data", str(model_dir)))
    store = app.state.store
    _, secret = auth.create_token(store, "alice")
    worker = Worker(
        store, DataDir(tmp_path / "data"), EngineSettings(base_model=str(model_dir)), 0.0,
        worker_id="w1", lease_s=60.0, serve_inference=False,
    )  # fmt: skip
    worker._load_engine()
    return app, store, worker, {"Authorization": f"Bearer {secret}"}


def test_events_are_append_only_and_validation_is_its_own_event(tmp_path, tiny_llama_dir):
    app, store, worker, h = _setup(tmp_path, tiny_llama_dir)
    with TestClient(app) as client:
        train = upload(client, h, jsonl(ROWS)).json()["id"]
        valid = upload(client, h, jsonl(ROWS[:2]), name="valid.jsonl").json()["id"]
        tr = {"max_steps": 4, "save_every_steps": 2, "eval_every_steps": 2, "max_seq_len": 32}
        body = {
            "training_file": train, "validation_file": valid, "hyperparameters": {"batch_size": 2},
            "lorafleet": {"training": tr},
        }  # fmt: skip
        jid = client.post("/v1/fine_tuning/jobs", headers=h, json=body).json()["id"]
        snapshots = []
        deadline = time.monotonic() + 120
        while store.get_job_any(jid).status not in ("succeeded", "failed"):
            assert time.monotonic() < deadline
            _loop(worker)
            snapshots.append(_events(client, h, jid))
        final = _events(client, h, jid)
    assert store.get_job_any(jid).status == "succeeded", store.get_job_any(jid).error
    # every list seen while it trained is the start of the final one, event for event (id, data, message)
    for seen in snapshots:
        assert final[: len(seen)] == seen
    ids = [int(e["id"].removeprefix("ftevent-")) for e in final]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    metrics = [e for e in final if e["type"] == "metrics"]
    assert [e["data"]["step"] for e in metrics] == [1, 2, 3, 4]  # exactly one per step
    assert all("valid_loss" not in e["data"] and "validation" not in e["message"] for e in metrics)
    vals = [(i, e) for i, e in enumerate(final) if "valid_loss" in e["data"]]
    assert [e["data"]["step"] for _, e in vals] == [2, 4]
    for i, e in vals:
        assert e["type"] == "message" and e["message"] == f"Step {e['data']['step']}: validation loss=" + (
            f"{e['data']['valid_loss']:.4f}"
        )
        before = final[i - 1]  # right after its step's metrics event
        assert before["type"] == "metrics" and before["data"]["step"] == e["data"]["step"]
    assert final[-1]["message"].startswith("Training succeeded")


def test_nothing_of_the_worker_follows_a_cancel(tmp_path, tiny_llama_dir):
    app, store, worker, h = _setup(tmp_path, tiny_llama_dir)
    with TestClient(app) as client:
        train = upload(client, h, jsonl(ROWS)).json()["id"]
        tr = {"max_steps": 40, "save_every_steps": 100, "max_seq_len": 32}
        body = {"training_file": train, "hyperparameters": {"batch_size": 2}, "lorafleet": {"training": tr}}
        jid = client.post("/v1/fine_tuning/jobs", headers=h, json=body).json()["id"]
        deadline = time.monotonic() + 120
        while store.get_job_any(jid).step < 2:
            assert time.monotonic() < deadline
            _loop(worker)
        # the engine still holds the job when the cancel lands: its next micro-batches run, unrecorded
        assert client.post(f"/v1/fine_tuning/jobs/{jid}/cancel", headers=h).json()["status"] == "cancelled"
        worker._step()
        worker._step()
        for _ in range(3):
            _loop(worker)
        events = _events(client, h, jid)
    assert events[-1]["message"] == "Job cancelled by the user", [e["message"] for e in events[-3:]]
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] == store.get_job_any(jid).step
    assert worker.leases.get(jid) is None


def test_a_step_trained_again_keeps_its_event_id_and_place(store):
    jid = f"ftjob-{1:024x}"

    def ev(step, loss):
        return EventRecord(jid, "metrics", f"step {step}: {loss}", 0.0, step=step, data={"train_loss": loss})

    store.add_events([ev(1, 3.0), ev(2, 2.5), ev(3, 2.0)])
    store.add_events([EventRecord(jid, "message", "Resumed from the checkpoint at step 2", 0.0)])
    before, _ = store.list_events(jid, None, 100, ascending=True)
    store.add_events([ev(3, 1.9), ev(4, 1.5)])  # resumed at step 2: step 3 trained again
    events, more = store.list_events(jid, None, 100, ascending=True)
    assert not more
    assert [e.seq for e in events[:4]] == [e.seq for e in before]  # nothing moved, nothing renumbered
    assert events[4].seq > before[-1].seq
    assert [(e.step, e.data.get("train_loss")) for e in events] == [
        (1, 3.0), (2, 2.5), (3, 1.9), (None, None), (4, 1.5),
    ]  # fmt: skip
    assert events[2].message == "step 3: 1.9"
    page, more = store.list_events(jid, None, 2, ascending=False)
    assert [e.step for e in page] == [4, None] and more
