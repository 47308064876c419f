"""The fine-tuning service end to end: a real ``lorafleet serve`` (uvicorn + worker process + the training
engine) on a tiny random LLaMA, driven over loopback HTTP, by the ``lorafleet jobs`` client (the dashboard's
browser test is ``test_dashboard_browser.py``).

Oracles: HF PEFT loads every downloaded adapter onto the transformers model and its rank and targets are
the ones requested; the zip holds exactly the files the engine exported; the checkpoint a killed job resumes
from is the newest one the store recorded (a ``step-N`` folder the kill left unrecorded is trained again).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from helpers.peft_oracle import rel_diff
from helpers.serve import Server
from lorafleet.service import auth
from lorafleet.service.files import DataDir
from lorafleet.service.store import SQLiteStore

pytestmark = pytest.mark.slow

TERMINAL = ("succeeded", "failed", "cancelled")
STEPS = 24  # per job of the two-tenant run: long enough that both are admitted while the other trains
# jobs killed mid-training: long enough that the test sees them past a checkpoint and still running (a step of
# the tiny model takes ~10 ms on one free core, and the test polls every 50 ms)
LONG = 120
QA = [{"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(24)]
CHAT = [
    {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}!"}]}
    for w in ("hello", "world", "fox", "dog", "Paris", "tiny", "test", "quick")
]


def _job(training_file: str, hp: dict, adapter: dict | None = None, **top) -> dict:
    """A job body from flat settings: OpenAI's hyperparameters (a learning rate as its multiplier of the
    base rate 1e-4), the rest in the lorafleet extension field."""
    hp = dict(hp)
    openai_hp = {k: hp.pop(k) for k in ("batch_size", "n_epochs") if k in hp}
    if "learning_rate" in hp:
        openai_hp["learning_rate_multiplier"] = hp.pop("learning_rate") / 1e-4
    ext: dict = {"training": hp, **({"adapter": adapter} if adapter else {})}
    return {"training_file": training_file, "hyperparameters": openai_hp, "lorafleet": ext, **top}


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _client(server: Server, token: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def _wait(
    client: httpx.Client, job_id: str, until=TERMINAL, timeout: float = 300.0, server: Server | None = None
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if until(job) if callable(until) else job["status"] in until:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stuck: {job}\n{server.tail() if server else ''}")


def _metrics(client: httpx.Client, job_id: str) -> list[dict]:
    events, after = [], None
    while True:
        q = {"order": "asc", "limit": 1000, **({"after": after} if after else {})}
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=q).json()
        events += page["data"]
        if not page["has_more"]:
            return events
        after = page["data"][-1]["id"]


def _file_named(client: httpx.Client, filename: str) -> str:
    return next(f["id"] for f in client.get("/v1/files").json()["data"] if f["filename"] == filename)


def _cli(server: Server, token: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORAFLEET_URL": server.url, "LORAFLEET_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "lorafleet", "jobs", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _peft_check(model_dir: Path, adapter_dir: Path, rank: int, targets: set[str]) -> None:
    """HF PEFT loads the adapter on the transformers model; rank and targets are the requested ones; the
    trained B matrices are not zero (PEFT starts them at zero) and change the model's logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["r"] == rank and set(cfg["target_modules"]) == targets
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        before = base(ids).logits
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded
    modules = {n.split(".lora_")[0].split(".")[-1] for n in loaded}
    assert modules == targets, modules
    assert all(p.abs().sum() > 0 for n, p in loaded.items() if "lora_B" in n)
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(before, after)


# -- one server for the two-tenant run, the load test, the CLI ------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("service")
    data = root / "data"
    DataDir(data).create()
    store = SQLiteStore(DataDir(data).db)
    tokens = {t: auth.create_token(store, t)[1] for t in ("alice", "bob")}
    server = Server(tiny_llama_dir, data).start()
    yield {"server": server, "tokens": tokens, "root": root, "model": tiny_llama_dir}
    server.stop()
    # uvicorn ends a graceful SIGTERM shutdown by re-raising the signal
    assert server.proc.returncode in (0, -signal.SIGTERM), server.tail()
    assert _dead(server.worker_pid), "the worker outlived its stopped server"


@pytest.fixture(scope="module")
def trained(service):
    """Alice and Bob each upload data and create a job, one right after the other; both train together."""
    server, tokens, root = service["server"], service["tokens"], service["root"]
    alice, bob = _client(server, tokens["alice"]), _client(server, tokens["bob"])
    fa = alice.post(
        "/v1/files", files={"file": ("qa.jsonl", _write_jsonl(root / "qa.jsonl", QA).read_bytes())}
    )
    fb = bob.post(
        "/v1/files", files={"file": ("chat.jsonl", _write_jsonl(root / "chat.jsonl", CHAT).read_bytes())}
    )
    assert fa.status_code == fb.status_code == 200, (fa.text, fb.text)
    common = {"max_steps": STEPS, "learning_rate": 5e-3, "max_seq_len": 64, "lr_scheduler": "constant"}
    body_a = _job(
        fa.json()["id"], {"batch_size": 4, "save_every_steps": 8, **common}, suffix="alice",
        adapter={"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    )  # fmt: skip
    body_b = _job(
        fb.json()["id"], {"batch_size": 2, **common}, suffix="bob",
        adapter={"rank": 8, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "o_proj"]},
    )  # fmt: skip
    job_a = alice.post("/v1/fine_tuning/jobs", json=body_a).json()["id"]
    job_b = bob.post("/v1/fine_tuning/jobs", json=body_b).json()["id"]
    return {
        "alice": (alice, _wait(alice, job_a, server=server)),
        "bob": (bob, _wait(bob, job_b, server=server)),
    }


def test_two_tenants_train_together_download_and_stay_apart(service, trained, tmp_path):
    server, tokens, model = service["server"], service["tokens"], service["model"]
    (alice, a), (bob, b) = trained["alice"], trained["bob"]
    assert a["status"] == b["status"] == "succeeded", (a, b)
    assert (
        a["lorafleet"]["step"],
        a["lorafleet"]["total_steps"],
        b["lorafleet"]["step"],
        b["lorafleet"]["total_steps"],
    ) == (STEPS,) * 4
    # both trained together on the one engine: each one's steps began before the other's ended
    ma = [e for e in _metrics(alice, a["id"]) if e["type"] == "metrics"]
    mb = [e for e in _metrics(bob, b["id"]) if e["type"] == "metrics"]
    assert [e["data"]["step"] for e in ma] == [e["data"]["step"] for e in mb] == list(range(1, STEPS + 1))
    assert ma[0]["created_at"] < mb[-1]["created_at"] and mb[0]["created_at"] < ma[-1]["created_at"]
    ckpts = alice.get(f"/v1/fine_tuning/jobs/{a['id']}/checkpoints").json()["data"]
    assert [c["step_number"] for c in ckpts] == [24, 16]  # the engine keeps the newest two on disk

    # Alice downloads over HTTP: the zip holds exactly the engine's exported PEFT folder
    engine_dir = DataDir(server.data).adapter_dir(a["fine_tuned_model"])
    z = alice.get(f"/v1/adapters/{a['fine_tuned_model']}/download")
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
        names = {n: zf.read(n) for n in zf.namelist()}
        zf.extractall(tmp_path / "alice")
    expected = {
        f"{a['fine_tuned_model']}/{p.name}": p.read_bytes() for p in engine_dir.iterdir() if p.is_file()
    }
    assert names == expected and f"{a['fine_tuned_model']}/adapter_config.json" in names
    _peft_check(model, tmp_path / "alice" / a["fine_tuned_model"], 4, {"q_proj", "v_proj"})
    # Bob downloads with the CLI (by job id), which unpacks the folder
    r = _cli(server, tokens["bob"], "download", b["id"], "--output", str(tmp_path / "bob"))
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == tmp_path / "bob" / b["fine_tuned_model"]
    _peft_check(model, Path(r.stdout.strip()), 8, {"q_proj", "k_proj", "o_proj"})

    # neither sees the other's jobs, files, events or adapters
    for me, mine, theirs in ((alice, a, b), (bob, b, a)):
        listed = me.get("/v1/fine_tuning/jobs").json()["data"]
        assert theirs["id"] not in {j["id"] for j in listed} and mine["id"] in {j["id"] for j in listed}
        for path in (
            f"/v1/fine_tuning/jobs/{theirs['id']}", f"/v1/fine_tuning/jobs/{theirs['id']}/events",
            f"/v1/fine_tuning/jobs/{theirs['id']}/checkpoints", f"/v1/files/{theirs['training_file']}",
            f"/v1/adapters/{theirs['fine_tuned_model']}", f"/v1/adapters/{theirs['fine_tuned_model']}/download",
        ):  # fmt: skip
            assert me.get(path).status_code == 404, path
        assert me.post(f"/v1/fine_tuning/jobs/{theirs['id']}/cancel").status_code == 404
        assert [x["id"] for x in me.get("/v1/adapters").json()["data"]] == [mine["fine_tuned_model"]]
    # the CLI shows Bob his job and only his
    r = _cli(server, tokens["bob"], "list")
    assert r.returncode == 0 and b["id"] in r.stdout and a["id"] not in r.stdout
    r = _cli(server, tokens["bob"], "show", b["id"])
    assert r.returncode == 0 and "succeeded" in r.stdout and "Training succeeded" in r.stdout
    r = _cli(server, tokens["bob"], "show", a["id"])
    assert r.returncode == 2 and "404" in r.stderr


def test_each_tenant_gets_the_adapter_its_job_trains_alone(service, trained, tmp_path):
    """Co-tenancy changes nothing: each job's adapter (dropout 0.1, trained beside the other tenant's job)
    equals the same job's configs trained alone by a fresh engine in this process."""
    from lorafleet.service.jobspec import EngineSettings, job_configs
    from lorafleet.train.engine import Engine
    from lorafleet.train.task import TaskState

    server, model = service["server"], service["model"]
    dd = DataDir(server.data)
    store = SQLiteStore(dd.db)
    for tenant in ("alice", "bob"):
        job = store.get_job_any(trained[tenant][1]["id"])
        fid = job.spec["training_file"]
        files = {fid: (dd.file_path(fid), store.get_file(job.tenant, fid).format)}
        out = tmp_path / tenant
        settings = EngineSettings(base_model=str(model))
        cfgs = job_configs(job.spec, job.id, job.adapter_id, files, settings, out)
        assert cfgs.adapter.dropout == 0.1
        engine = Engine(settings.run_config(out), tensorboard=False)
        engine.add_task(cfgs.dataset, cfgs.adapter, cfgs.task, cfgs.eval_dataset)
        states: dict[str, TaskState] = engine.run()
        assert states[job.id].status == "succeeded", states
        alone = load_file(str(out / "adapters" / job.adapter_id / "adapter_model.safetensors"))
        together = load_file(str(dd.adapter_dir(job.adapter_id) / "adapter_model.safetensors"))
        assert rel_diff(alone, together) <= 1e-5, tenant


def test_200_concurrent_status_requests_while_training(service, trained):
    server, tokens = service["server"], service["tokens"]
    alice = _client(server, tokens["alice"])
    fid = _file_named(alice, "qa.jsonl")
    body = _job(fid, {"batch_size": 4, "max_steps": 100000, "max_seq_len": 64})
    job_id = alice.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    before = _wait(
        alice, job_id, until=lambda j: j["status"] == "running" and j["lorafleet"]["step"] >= 1, server=server
    )

    async def one() -> tuple[int, float]:
        # a bare HTTP/1.1 request on its own connection: an HTTP client library spends more CPU per request
        # than the server does, and on 2 cores that would be what the latencies measured
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            f"GET /v1/fine_tuning/jobs/{job_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {tokens['alice']}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        raw = await reader.read()
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert json.loads(body)["id"] == job_id, raw[:500]
        return int(head.split(b" ", 2)[1]), time.perf_counter() - t0

    async def burst() -> list[tuple[int, float]]:
        return await asyncio.gather(*(one() for _ in range(200)))

    t0 = time.perf_counter()
    results = asyncio.run(burst())
    wall = time.perf_counter() - t0
    statuses = [s for s, _ in results]
    lat = sorted(d for _, d in results)
    p50, p99 = lat[len(lat) // 2], lat[int(0.99 * len(lat)) - 1]
    print(f"\n200 concurrent status requests: wall {wall:.2f} s, p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, "
          f"max {lat[-1] * 1e3:.0f} ms")  # fmt: skip
    (service["root"] / "load.json").write_text(json.dumps({"p50_s": p50, "p99_s": p99, "wall_s": wall}))
    assert statuses == [200] * 200
    # training went on meanwhile; then cancelling the running job stops it
    after = _wait(
        alice, job_id, until=lambda j: j["lorafleet"]["step"] > before["lorafleet"]["step"], server=server
    )
    assert after["status"] == "running"
    cancelled_at = time.time()
    assert alice.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    # a heartbeat taken after the cancel that holds no job: the worker has let go of it (an older beat may
    # still count it, or predate its start)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        beat = httpx.get(f"{server.url}/healthz").json()["worker"]
        if beat["time"] > cancelled_at and beat["active_jobs"] == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the worker still trains after the cancel: {beat}\n{server.tail()}")
    step = alice.get(f"/v1/fine_tuning/jobs/{job_id}").json()["lorafleet"]["step"]
    time.sleep(1.0)
    final = alice.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert (final["status"], final["lorafleet"]["step"]) == ("cancelled", step)


def test_job_the_engine_rejects_fails_with_the_reason(service, trained):
    """Rows that are valid JSONL but leave no supervised token after cutting at max_seq_len: the engine's
    data rules refuse them when the job starts; the job fails with that reason, not the server."""
    server, tokens = service["server"], service["tokens"]
    alice = _client(server, tokens["alice"])
    long_prompts = [{"prompt": "hello world " * 20, "completion": " yes"} for _ in range(3)]
    fid = alice.post(
        "/v1/files", files={"file": ("long.jsonl", "".join(json.dumps(r) + "\n" for r in long_prompts))}
    )
    body = _job(fid.json()["id"], {"max_seq_len": 8, "max_steps": 2})
    job = _wait(alice, alice.post("/v1/fine_tuning/jobs", json=body).json()["id"], server=server)
    assert job["status"] == "failed", job
    assert (
        job["error"]["message"].startswith(f"{fid.json()['id']}:1: ")
        and "max_seq_len" in job["error"]["message"]
    )
    assert str(server.data) not in job["error"]["message"]  # the server's folders are not shown
    events = [e["message"] for e in _metrics(alice, job["id"])]
    assert events[-1].startswith("Job failed: ") and events[0] == "Created fine-tuning job"
    assert httpx.get(f"{server.url}/healthz").json()["worker"]["alive"]


def test_dpo_job_with_validation_file_from_the_cli(service, trained):
    """``lorafleet jobs create --wait`` uploads a preference file and a held-out file and follows a DPO
    job: each step printed once, validation losses as events of their own at the evaluation steps, the
    task's own numbers (rewards) come along, and the adapter downloads."""
    server, tokens, root = service["server"], service["tokens"], service["root"]
    pairs = [
        {"prompt": f"What is {i} plus {i}?", "chosen": f" It is {2 * i}.", "rejected": f" It is {2 * i + 1}."}
        for i in range(8)
    ]
    train, valid = (
        _write_jsonl(root / "pairs.jsonl", pairs[:6]),
        _write_jsonl(root / "pairs-valid.jsonl", pairs[6:]),
    )
    r = _cli(
        server, tokens["bob"], "create", "--training-file", str(train), "--validation-file", str(valid),
        "--method", "dpo", "--beta", "0.2", "--batch-size", "2", "--max-steps", "4", "--eval-every-steps", "2",
        "--max-seq-len", "64", "--learning-rate-multiplier", "10", "--wait", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert (
        job["status"] == "succeeded"
        and job["method"]["type"] == "dpo"
        and job["method"]["dpo"]["hyperparameters"]["beta"] == 0.2
    ), job
    assert "Training succeeded" in r.stderr and "uploaded" in r.stderr  # --wait printed the events
    bob = _client(server, tokens["bob"])
    assert {
        f["format"]
        for f in bob.get("/v1/files").json()["data"]
        if f["id"] in (job["training_file"], job["validation_file"])
    } == {"preference"}
    # --wait printed each step once, and each validation once, as its own event
    for step in (1, 2, 3, 4):
        assert r.stderr.count(f"Step {step}/4: training loss=") == 1, r.stderr
    assert [int(x) for x in re.findall(r"Step (\d): validation loss=", r.stderr)] == [2, 4], r.stderr
    events = _metrics(bob, job["id"])
    metrics = {e["data"]["step"]: e["data"] for e in events if e["type"] == "metrics"}
    assert sorted(metrics) == [1, 2, 3, 4]
    assert [e["data"]["step"] for e in events if "valid_loss" in e["data"]] == [2, 4]
    assert all(d["train_loss"] > 0 and len(d) > 5 for d in metrics.values())  # DPO's rewards/accuracies too
    z = bob.get(f"/v1/adapters/{job['fine_tuned_model']}/download")
    assert (
        z.status_code == 200
        and f"{job['fine_tuned_model']}/adapter_config.json"
        in zipfile.ZipFile(io.BytesIO(z.content)).namelist()
    )


def _checkpoint_steps(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if not p.name.endswith(".tmp"))


def _resume_point(store: SQLiteStore, data: Path, job_id: str) -> tuple[int, list[int]]:
    """After a kill: the step a restarted worker must resume from (the newest checkpoint the store recorded)
    and the folders on disk past it (a kill between writing a checkpoint and recording it leaves one), which
    the resuming worker removes and trains again."""
    step = _recorded_step(store, job_id)
    return step, [s for s in _checkpoint_steps(DataDir(data).checkpoint_dir(job_id)) if s > step]


def _recorded_step(store: SQLiteStore, job_id: str) -> int:
    """The step of the newest checkpoint the store recorded for the job (0: none)."""
    recorded, _ = store.list_checkpoints(job_id, None, 1)
    return recorded[0].step if recorded else 0


def _past_checkpoint(store: SQLiteStore, job: dict) -> bool:
    """The job has a recorded checkpoint and has trained past it (so a kill now makes it redo steps)."""
    return 0 < _recorded_step(store, job["id"]) < job["lorafleet"]["step"]


def test_killed_worker_is_restarted_and_resumes(service, trained):
    server, tokens = service["server"], service["tokens"]
    alice = _client(server, tokens["alice"])
    fid = _file_named(alice, "qa.jsonl")
    hp = {"batch_size": 2, "max_steps": LONG, "max_seq_len": 64, "save_every_steps": 5}
    r = alice.post("/v1/fine_tuning/jobs", json=_job(fid, hp))
    job_id = r.json()["id"]
    store = SQLiteStore(DataDir(server.data).db)
    _wait(alice, job_id, until=lambda j: j["status"] in TERMINAL or _past_checkpoint(store, j))
    old_pid = httpx.get(f"{server.url}/healthz").json()["worker"]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while not _dead(old_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    resume_from, unrecorded = _resume_point(store, server.data, job_id)
    assert resume_from >= 5 and len(unrecorded) <= 1, (resume_from, unrecorded)
    assert alice.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "running"
    job = _wait(alice, job_id, server=server)  # the supervisor starts a new worker, which resumes the job
    assert job["status"] == "succeeded" and job["lorafleet"]["step"] == LONG
    assert httpx.get(f"{server.url}/healthz").json()["worker"]["pid"] != old_pid
    events = _metrics(alice, job_id)
    assert f"Resumed from the checkpoint at step {resume_from} of {LONG}" in [e["message"] for e in events]
    assert [e["data"]["step"] for e in events if e["type"] == "metrics"] == list(range(1, LONG + 1))


# -- durability: SIGKILL mid-training, restart, resume ----------------------------------------------------


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie nobody reaped is dead too


def test_sigkill_mid_training_then_restart_resumes_from_checkpoints(tmp_path, tiny_llama_dir):
    data = tmp_path / "data"
    store = SQLiteStore(DataDir(data).create().db)
    token = auth.create_token(store, "carol")[1]
    server = Server(tiny_llama_dir, data, "--max-concurrent-tasks", "1").start()
    c = _client(server, token)
    fid = c.post(
        "/v1/files", files={"file": ("qa.jsonl", _write_jsonl(tmp_path / "qa.jsonl", QA).read_bytes())}
    ).json()["id"]
    hp = {"batch_size": 2, "max_seq_len": 64, "learning_rate": 1e-3, "save_every_steps": 5}
    job1 = c.post("/v1/fine_tuning/jobs", json=_job(fid, {**hp, "max_steps": LONG})).json()["id"]
    job2 = c.post("/v1/fine_tuning/jobs", json=_job(fid, {**hp, "max_steps": 4})).json()["id"]
    # kill once job 1 has a checkpoint and has trained past it (so some steps must be redone)
    j1 = _wait(c, job1, until=lambda j: j["status"] in TERMINAL or _past_checkpoint(store, j), server=server)
    assert j1["status"] == "running", j1
    # acknowledged just before the kill: must survive it
    job3 = c.post("/v1/fine_tuning/jobs", json=_job(fid, {**hp, "max_steps": 3})).json()["id"]
    worker_pid = server.worker_pid
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    deadline = time.monotonic() + 20
    while not _dead(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _dead(worker_pid), "the worker outlived its killed server"
    resume_from, unrecorded = _resume_point(store, data, job1)
    assert len(unrecorded) <= 1, (resume_from, unrecorded)
    at_kill = {j: store.get_job_any(j).status for j in (job1, job2, job3)}
    assert at_kill[job1] == "running" and at_kill[job2] in ("validating_files", "queued"), at_kill
    assert 5 <= resume_from < LONG

    server = Server(tiny_llama_dir, data, "--max-concurrent-tasks", "1").start()
    try:
        c = _client(server, token)
        done = {j: _wait(c, j, server=server) for j in (job1, job2, job3)}
        assert {j: d["status"] for j, d in done.items()} == dict.fromkeys(done, "succeeded")
        events = _metrics(c, job1)
        messages = [e["message"] for e in events if e["type"] == "message"]
        assert f"Resumed from the checkpoint at step {resume_from} of {LONG}" in messages, messages
        # every step once in the loss history, the redone ones replaced by their second run
        assert [e["data"]["step"] for e in events if e["type"] == "metrics"] == list(range(1, LONG + 1))
        assert done[job1]["lorafleet"]["step"] == LONG
        assert not any("Resumed" in e["message"] for e in _metrics(c, job2) + _metrics(c, job3))
        z = c.get(f"/v1/adapters/{done[job1]['fine_tuned_model']}/download")
        assert z.status_code == 200 and zipfile.ZipFile(io.BytesIO(z.content)).namelist()
    finally:
        server.stop()
