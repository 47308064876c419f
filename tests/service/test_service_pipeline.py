"""The service with its worker as a 2-stage pipeline (``lorafleet serve --nproc 2``, gloo on CPU), end to
end over HTTP, against its oracle: the same requests on a single-process worker (``--nproc 1``).

Tenant A's job starts; tenant B's job is created while A's trains; a third job is cancelled while it runs;
A's and B's adapters equal the single-process worker's (<= 1e-5 relative, adapter dropout 0.1). Then the
non-coordinator rank is SIGKILLed in the middle of a job: the whole group restarts, the job resumes from the
newest step both stages checkpointed and finishes with the undisturbed run's adapter, and the API shows
exactly one metrics event per step.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file
from test_service_e2e import QA, Server, _client, _job, _metrics, _wait, _write_jsonl

from helpers.peft_oracle import rel_diff
from lorafleet.service import auth
from lorafleet.service.files import DataDir
from lorafleet.service.store import SQLiteStore

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ADAPTER = {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]}
COMMON = {"learning_rate": 5e-3, "max_seq_len": 64, "lr_scheduler": "constant"}
# name -> (tenant, steps, batch size, save every, seed)
JOBS = {
    "a": ("alice", 120, 4, 20, 11),
    "b": ("bob", 40, 2, 10, 22),
    "c": ("alice", 2000, 2, 50, 33),  # cancelled while it runs
    "d": ("bob", 150, 2, 10, 44),  # its second stage is killed mid-job
}


def _body(file_id: str, name: str) -> dict:
    _, steps, bs, every, seed = JOBS[name]
    hp = {"batch_size": bs, "max_steps": steps, "save_every_steps": every, **COMMON}
    return _job(file_id, hp, adapter=ADAPTER, suffix=name, seed=seed)


def _start(root: Path, model: Path, name: str, *extra: str):
    data = root / name
    DataDir(data).create()
    store = SQLiteStore(DataDir(data).db)
    tokens = {t: auth.create_token(store, t)[1] for t in ("alice", "bob")}
    server = Server(model, data, "--no-inference", *extra).start(timeout=300)
    clients = {t: _client(server, tokens[t]) for t in tokens}
    files = {
        t: c.post("/v1/files", files={"file": ("qa.jsonl", (root / "qa.jsonl").read_bytes())}).json()["id"]
        for t, c in clients.items()
    }
    return server, clients, files


def _create(server, clients, files, name: str) -> str:
    tenant = JOBS[name][0]
    r = clients[tenant].post("/v1/fine_tuning/jobs", json=_body(files[tenant], name))
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _adapter(server, job: dict) -> dict:
    folder = DataDir(server.data).adapter_dir(job["fine_tuned_model"])
    return load_file(str(folder / "adapter_model.safetensors"))


def _ranks_beside(pid: int) -> list[int]:
    """The other processes that torchrun started beside ``pid`` (same parent)."""
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != pid:
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    out.append(int(p.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


@pytest.fixture(scope="module")
def oracle(tmp_path_factory, tiny_llama_dir):
    """A, B and D trained from the same requests by a single-process worker."""
    root = tmp_path_factory.mktemp("single")
    _write_jsonl(root / "qa.jsonl", QA)
    server, clients, files = _start(root, tiny_llama_dir, "single")
    try:
        ids = {n: _create(server, clients, files, n) for n in ("a", "b", "d")}
        jobs = {n: _wait(clients[JOBS[n][0]], i, server=server) for n, i in ids.items()}
        assert all(j["status"] == "succeeded" for j in jobs.values()), jobs
        return {n: _adapter(server, j) for n, j in jobs.items()}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("pipeline")
    _write_jsonl(root / "qa.jsonl", QA)
    server, clients, files = _start(root, tiny_llama_dir, "p2", "--nproc", "2")
    yield server, clients, files
    server.stop()


def test_nproc_2_trains_jobs_arriving_and_cancelled_like_one_process(pipeline, oracle):
    server, clients, files = pipeline
    alice, bob = clients["alice"], clients["bob"]
    a = _create(server, clients, files, "a")
    _wait(alice, a, until=lambda j: j["status"] == "running" and j["lorafleet"]["step"] >= 3, server=server)
    b = _create(server, clients, files, "b")  # arrives while A trains
    c = _create(server, clients, files, "c")
    job_c = _wait(
        alice, c, until=lambda j: j["status"] == "running" and j["lorafleet"]["step"] >= 3, server=server
    )
    assert alice.get(f"/v1/fine_tuning/jobs/{a}").json()["status"] == "running"
    assert alice.post(f"/v1/fine_tuning/jobs/{c}/cancel").json()["status"] == "cancelled"
    job_a, job_b = _wait(alice, a, server=server), _wait(bob, b, server=server)
    assert job_a["status"] == job_b["status"] == "succeeded", (job_a, job_b, server.tail())
    # B trained while A did: each one's steps began before the other's ended
    ma = [e for e in _metrics(alice, a) if e["type"] == "metrics"]
    mb = [e for e in _metrics(bob, b) if e["type"] == "metrics"]
    assert [e["data"]["step"] for e in ma] == list(range(1, JOBS["a"][1] + 1))
    assert [e["data"]["step"] for e in mb] == list(range(1, JOBS["b"][1] + 1))
    assert mb[0]["created_at"] < ma[-1]["created_at"]
    # the cancelled job stopped where it was, far from its end
    time.sleep(0.5)
    final_c = alice.get(f"/v1/fine_tuning/jobs/{c}").json()
    assert final_c["status"] == "cancelled" and final_c["lorafleet"]["step"] < JOBS["c"][1], final_c
    assert final_c["lorafleet"]["step"] >= job_c["lorafleet"]["step"]
    # it ran as two stages: one checkpoint folder per stage
    stages = sorted(p.name for p in DataDir(server.data).checkpoint_dir(a).iterdir())
    assert stages == ["stage-0-of-2", "stage-1-of-2"], stages
    for name, job in (("a", job_a), ("b", job_b)):
        assert rel_diff(_adapter(server, job), oracle[name]) <= 1e-5, name


def test_killed_second_stage_restarts_the_group_and_the_job_finishes_exactly(pipeline, oracle):
    server, clients, files = pipeline
    bob = clients["bob"]
    d = _create(server, clients, files, "d")
    checkpoints = f"/v1/fine_tuning/jobs/{d}/checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # past a recorded checkpoint, still training
        job = bob.get(f"/v1/fine_tuning/jobs/{d}").json()
        saved = bob.get(checkpoints).json()["data"]
        if saved and job["status"] == "running" and job["lorafleet"]["step"] > saved[0]["step_number"] + 2:
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"job {d} never got past a checkpoint: {job}\n{server.tail()}")
    coordinator = httpx.get(f"{server.url}/healthz").json()["worker"]["pid"]
    others = _ranks_beside(coordinator)
    assert len(others) == 1, others
    os.kill(others[0], signal.SIGKILL)
    job = _wait(bob, d, timeout=400, server=server)
    assert job["status"] == "succeeded", (job, server.tail())
    restarted = httpx.get(f"{server.url}/healthz").json()["worker"]["pid"]
    assert restarted != coordinator, "the group was not restarted"
    steps = [e["data"]["step"] for e in _metrics(bob, d) if e["type"] == "metrics"]
    assert steps == list(range(1, JOBS["d"][1] + 1)), steps  # each step exactly once
    assert any("Resumed from the checkpoint" in e["message"] for e in _metrics(bob, d))
    assert rel_diff(_adapter(server, job), oracle["d"]) <= 1e-5
