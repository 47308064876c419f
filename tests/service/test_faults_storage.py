"""Storage faults through the service (issue 19 items 4 and 8): the API and a worker's own loop over one data
folder whose job folders refuse writes for a while (``helpers.faults.unwritable``: a real filesystem
condition, made with chmod, ``chattr +i`` as root, or a file in the folder's place where neither works).

- job creation is a 503 with ``Retry-After`` in the API's error shape while the folders cannot be written;
- a running job whose checkpoint cannot be written waits and goes on once the disk is back, each step's
  metrics event stored once; a job queued meanwhile waits, unclaimed; the reference for the weights is the
  same request trained after the fault (same seed and data: the same adapter);
- when the fault outlasts the retries the job fails with a reason and no server path;
- a job's checkpoint list (and ``/v1/models``) holds only the checkpoints still on disk.
"""

from __future__ import annotations

import logging
import shutil
import time

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from helpers.faults import unwritable
from helpers.peft_oracle import rel_diff
from helpers.service import ROWS, api_client, error_message, jsonl, upload
from lorafleet.service import auth
from lorafleet.service.app import ServiceSettings, create_app
from lorafleet.service.files import DataDir
from lorafleet.service.jobspec import EngineSettings
from lorafleet.service.worker import Worker
from lorafleet.train.storage import StorageHolds, StorageRetry

JOBS = "/v1/fine_tuning/jobs"
STEPS = 6


def _body(fid: str) -> dict:
    tr = {"max_steps": STEPS, "save_every_steps": 2, "max_seq_len": 32}
    return {
        "training_file": fid,
        "seed": 7,
        "hyperparameters": {"batch_size": 2},
        "lorafleet": {"training": tr},
    }


def _drive(worker: Worker, until, timeout: float = 120.0) -> None:
    """The worker's loop body (sync, one micro-batch) until ``until()``."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the worker did not get there in time"
        worker.sync()
        worker._drop_lost()
        worker._step()


def _metric_steps(store, job_id: str) -> list[int]:
    events, _ = store.list_events(job_id, None, 1000, ascending=True)
    return [e.step for e in events if e.type == "metrics"]


def _messages(store, job_id: str, level: str | None = None) -> list[str]:
    events, _ = store.list_events(job_id, None, 1000, ascending=True)
    return [e.message for e in events if level is None or e.level == level]


def test_job_creation_is_a_503_while_the_data_folder_cannot_be_written(tmp_path):
    with api_client(tmp_path) as (client, h, app):
        dd = app.state.service.dd
        fid = upload(client, h["alice"], jsonl(ROWS)).json()["id"]
        with unwritable(dd.engine):
            r = client.post(JOBS, headers=h["alice"], json=_body(fid))
            assert r.status_code == 503, r.text
            assert int(r.headers["Retry-After"]) > 0
            msg = error_message(r)
            assert r.json()["error"]["code"] == "storage_unavailable"
            assert "retry later" in msg and "/" not in msg, msg
            # a bad request is still a 400, not a 503
            assert (
                client.post(JOBS, headers=h["alice"], json={"training_file": fid, "x": 1}).status_code == 400
            )
        assert client.get(JOBS, headers=h["alice"]).json()["data"] == []  # no job was half-created
        r = client.post(JOBS, headers=h["alice"], json=_body(fid))
        assert r.status_code == 200, r.text


def _service(tmp_path, model_dir, attempts: int):
    app = create_app(ServiceSettings(tmp_path / "data", str(model_dir)))
    store, dd = app.state.store, DataDir(tmp_path / "data")
    _, secret = auth.create_token(store, "alice")
    worker = Worker(
        store, dd, EngineSettings(str(model_dir), max_concurrent_tasks=2), 0.0, worker_id="w1", lease_s=60.0,
        serve_inference=False,
    )  # fmt: skip
    worker._load_engine()
    worker.engine.storage = StorageHolds(StorageRetry(first_s=0.02, max_s=0.1, attempts=attempts))
    return app, store, dd, worker, {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def disk_fault_run(tmp_path_factory, tiny_llama_dir):
    """Job A trains; from its step 2 on the engine folder refuses writes, while job B is created just
    before. Observations during the fault and after it (the disk back, both jobs trained to the end)."""
    tmp = tmp_path_factory.mktemp("disk_fault")
    app, store, dd, worker, h = _service(tmp, tiny_llama_dir, attempts=10_000)
    seen: dict = {}
    with TestClient(app) as client:
        fid = upload(client, h, jsonl(ROWS)).json()["id"]
        a = client.post(JOBS, headers=h, json=_body(fid)).json()["id"]
        _drive(worker, lambda: store.get_job_any(a).step >= 1)
        b = client.post(JOBS, headers=h, json=_body(fid)).json()["id"]
        with unwritable(dd.engine) as mode:
            _drive(worker, lambda: len(_messages(store, a, "warning")) >= 3)
            for _ in range(20):  # and on: nothing changes while the disk is down
                worker.sync()
                worker._step()
            seen["mode"] = mode
            seen["a"], seen["b"] = store.get_job_any(a), store.get_job_any(b)
            seen["a_engine_step"] = worker.engine.state(a).step
            seen["b_leases"] = store.lease_history(b)
            seen["worker_message"] = worker.announcement().message
            seen["create"] = client.post(JOBS, headers=h, json=_body(fid))
            seen["warnings"] = _messages(store, a, "warning")
        done = ("succeeded", "failed", "cancelled")
        _drive(worker, lambda: all(store.get_job_any(j).status in done for j in (a, b)))
        seen["after_message"] = worker.announcement().message
        yield client, h, store, dd, a, b, seen


@pytest.mark.slow  # the module's training run (about 15 s on 2 cores) is its fixture
def test_running_jobs_wait_out_a_disk_fault_and_new_ones_wait_unclaimed(disk_fault_run):
    client, h, store, dd, a, b, seen = disk_fault_run
    # during the fault: A stopped at step 2 (trained and reported; its checkpoint refused), still running
    assert (seen["a"].status, seen["a"].step, seen["a_engine_step"]) == ("running", 2, 2), seen["a"]
    assert seen["warnings"][0].startswith("Checkpoint at step 2 could not be written ("), seen["warnings"]
    assert all("/" not in m for m in seen["warnings"]), seen["warnings"]
    # B was validated and waits, unclaimed; new jobs are refused with a 503 meanwhile
    assert (seen["b"].status, seen["b_leases"]) == ("queued", []), seen["b"]
    assert seen["worker_message"].startswith("storage unavailable"), seen["worker_message"]
    assert seen["create"].status_code == 503 and seen["create"].headers["Retry-After"]
    # after it: both finished, every step's metrics event stored exactly once
    for j in (a, b):
        job = store.get_job_any(j)
        assert (job.status, job.step, job.error) == ("succeeded", STEPS, None), job
        assert _metric_steps(store, j) == list(range(1, STEPS + 1)), j
    assert "Checkpoint saved at step 2" in _messages(store, a)
    assert seen["after_message"] == ""
    # A, held through the fault, has the weights of the same request trained after it (B)
    tensors = {}
    for j in (a, b):
        adapter = client.get(f"{JOBS}/{j}", headers=h).json()["fine_tuned_model"]
        tensors[j] = load_file(str(dd.adapter_dir(adapter) / "adapter_model.safetensors"))
    assert rel_diff(tensors[a], tensors[b]) <= 1e-4


@pytest.mark.slow  # the module's training run (about 15 s on 2 cores) is its fixture
def test_no_5xx_but_503_from_any_route_while_the_data_folder_cannot_be_written(disk_fault_run):
    """Every route, with the data folder's files, engine and exports folders unwritable: reads answer as
    usual; writes are a 503 with ``Retry-After`` in the error shape, and change nothing."""
    client, h, store, dd, a, b, _ = disk_fault_run
    adapter = store.get_job_any(a).adapter_id
    fid = store.get_job_any(a).spec["training_file"]
    other = upload(client, h, jsonl(ROWS)).json()["id"]
    calls = [
        ("GET", JOBS, None), ("GET", f"{JOBS}/{a}", None), ("GET", f"{JOBS}/{a}/events", None),
        ("GET", f"{JOBS}/{a}/checkpoints", None), ("GET", "/v1/files", None), ("GET", f"/v1/files/{fid}", None),
        ("GET", "/v1/models", None), ("GET", f"/v1/models/{adapter}", None), ("GET", "/v1/adapters", None),
        ("GET", f"/v1/adapters/{adapter}", None), ("GET", "/healthz", None),
        ("GET", f"/v1/adapters/{adapter}/download", None), ("POST", JOBS, _body(fid)),
        ("POST", f"{JOBS}/{a}/cancel", None), ("POST", f"{JOBS}/{a}/pause", None),
        ("DELETE", f"/v1/files/{other}", None), ("DELETE", f"/v1/models/{adapter}", None),
    ]  # fmt: skip
    with unwritable(dd.files, dd.engine, dd.exports) as mode:
        answers = {(m, u): client.request(m, u, headers=h, json=j) for m, u, j in calls}
        r = upload(client, h, jsonl(ROWS))
        answers[("POST", "/v1/files")] = r
    for call, r in answers.items():
        assert r.status_code < 500 or r.status_code == 503, (call, r.status_code, r.text)
        if r.status_code >= 400:
            assert error_message(r) and "/srv" not in r.text and str(dd.root) not in r.text, (call, r.text)
    unwritten = {c for c, r in answers.items() if r.status_code == 503}
    writes = {("POST", JOBS), ("DELETE", f"/v1/files/{other}"), ("POST", "/v1/files")}
    adapter_writes = {("GET", f"/v1/adapters/{adapter}/download"), ("DELETE", f"/v1/models/{adapter}")}
    # (where the folders are replaced by files, the adapter's folder is gone too: 409 and 404, not 503)
    expected = writes | (adapter_writes if mode != "replace" else set())
    assert unwritten == expected, {c: answers[c].status_code for c in answers}
    assert all(int(answers[c].headers["Retry-After"]) > 0 for c in unwritten)
    # nothing was half-done: the file and the model are still there, and work once the disk is back
    assert client.get(f"/v1/files/{other}", headers=h).status_code == 200
    assert client.get(f"/v1/models/{adapter}", headers=h).status_code == 200
    assert client.get(f"/v1/adapters/{adapter}/download", headers=h).status_code == 200
    assert client.delete(f"/v1/files/{other}", headers=h).status_code == 200


@pytest.mark.slow  # the module's training run (about 15 s on 2 cores) is its fixture
def test_checkpoint_list_holds_only_checkpoints_on_disk(disk_fault_run):
    """Issue 19 item 8: the engine keeps the newest two checkpoints; the store recorded all three; an
    operator then removes one more."""
    client, h, store, dd, a, _, _ = disk_fault_run
    assert [c.step for c in store.list_checkpoints(a, None, 10)[0]] == [6, 4, 2]

    def listed(**params) -> list[int]:
        r = client.get(f"{JOBS}/{a}/checkpoints", headers=h, params=params)
        assert r.status_code == 200, r.text
        return [c["step_number"] for c in r.json()["data"]]

    assert listed() == [6, 4]
    page = client.get(f"{JOBS}/{a}/checkpoints", headers=h, params={"limit": 1}).json()
    assert [c["step_number"] for c in page["data"]] == [6] and page["has_more"]
    assert listed(limit=1, after=page["data"][0]["id"]) == [4]
    shutil.rmtree(dd.checkpoint_dir(a) / "step-000004")
    assert listed() == [6]
    page = client.get(f"{JOBS}/{a}/checkpoints", headers=h, params={"limit": 1}).json()
    assert page["has_more"] is False
    adapter = store.get_job_any(a).adapter_id
    models = [m["id"] for m in client.get("/v1/models", headers=h).json()["data"]]
    assert [m for m in models if m.startswith(adapter + ":")] == [f"{adapter}:ckpt-step-6"]


def test_a_disk_fault_that_outlasts_the_retries_fails_the_job_without_server_paths(
    tmp_path, tiny_llama_dir, caplog
):
    app, store, dd, worker, h = _service(tmp_path, tiny_llama_dir, attempts=3)
    with TestClient(app) as client:
        fid = upload(client, h, jsonl(ROWS)).json()["id"]
        a = client.post(JOBS, headers=h, json=_body(fid)).json()["id"]
        _drive(worker, lambda: store.get_job_any(a).step >= 1)
        with caplog.at_level(logging.WARNING), unwritable(dd.engine):
            _drive(worker, lambda: store.get_job_any(a).status == "failed")
        job = client.get(f"{JOBS}/{a}", headers=h).json()
        error = job["error"]["message"]
        assert "checkpoint at step 2 could not be written after 3 attempts" in error, error
        assert "/" not in error and str(tmp_path) not in error, error
        events = client.get(f"{JOBS}/{a}/events", headers=h, params={"limit": 100}).json()["data"]
        assert not any(str(tmp_path) in e["message"] for e in events), events
        assert str(dd.checkpoint_dir(a)) in caplog.text  # the operator's log has the path
        # the disk is back: a new job is created and trains
        b = client.post(JOBS, headers=h, json=_body(fid)).json()["id"]
        _drive(worker, lambda: store.get_job_any(b).status in ("succeeded", "failed"))
        assert store.get_job_any(b).status == "succeeded", store.get_job_any(b).error
