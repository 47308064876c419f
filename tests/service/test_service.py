"""The fine-tuning service without training: store, tokens, uploads, the REST API's answers, the CLI's
token commands, and the rule that the API process never imports torch.

The API is driven in process (FastAPI's TestClient); ``test_service_e2e.py`` runs the real server and
worker. Expected answers come from the request itself (what a correct API must say about it), from a
plain reading of the uploaded file (``json.loads`` per line), and from hashlib for the stored tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
from fastapi.testclient import TestClient

from helpers.service import ROWS, api_client
from helpers.service import error_message as _error
from helpers.service import jsonl as _jsonl
from helpers.service import upload as _upload
from lorafleet.service import auth
from lorafleet.service.app import ServiceSettings, create_app
from lorafleet.service.files import DataDir, UploadError, safe_child, save_upload
from lorafleet.service.store import SQLiteStore


@pytest.fixture()
def api(tmp_path):
    """(client, {tenant: headers}, app) over a fresh data folder, upload limit 4 KiB."""
    with api_client(tmp_path) as got:
        yield got


# -- files and paths --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../x", "file-../../etc/passwd", "/etc/passwd", "file-" + "0" * 23 + "/", ".."]
)
def test_safe_child_refuses_traversal(tmp_path, name):
    with pytest.raises(ValueError, match="not a valid id"):
        safe_child(tmp_path, name, r"^file-[0-9a-f]{24}$", ".jsonl")
    assert DataDir(tmp_path).file_path("file-" + "a" * 24).parent == (tmp_path / "files").resolve()


def test_save_upload_reports_every_bad_line(tmp_path):
    lines = [
        json.dumps(ROWS[0]),
        "{not json",
        json.dumps(["a", "list"]),
        "",  # blank lines are allowed
        json.dumps({"prompt": "p"}),  # completion missing
        json.dumps(ROWS[1]),
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),  # chat without an assistant turn
    ]
    import io

    with pytest.raises(UploadError) as info:
        save_upload(io.BytesIO("\n".join(lines).encode()), tmp_path / "out.jsonl", max_bytes=10_000)
    # the oracle: which lines json.loads + the format rules reject, by 1-based line number
    assert [e.split(":")[0] for e in info.value.errors] == ["line 2", "line 3", "line 5", "line 7"]
    assert "invalid JSON" in info.value.errors[0] and "completion" in info.value.errors[2]
    assert not (tmp_path / "out.jsonl").exists()  # nothing half-written
    info2 = save_upload(io.BytesIO(_jsonl(ROWS)), tmp_path / "ok.jsonl", max_bytes=10_000)
    assert (info2.num_rows, info2.format) == (len(ROWS), "prompt_completion")
    assert [json.loads(x) for x in (tmp_path / "ok.jsonl").read_text().splitlines()] == ROWS
    # lines longer than the read chunk (64 KiB), and a last line without its newline
    rows = [{"text": "a" * 200_000}, {"text": "b"}, {"text": "c" * 70_000}]
    data = _jsonl(rows).rstrip(b"\n")
    info3 = save_upload(io.BytesIO(data), tmp_path / "long.jsonl", max_bytes=400_000)
    assert (info3.num_rows, info3.bytes) == (3, len(data) + 1)
    assert (tmp_path / "long.jsonl").read_bytes() == data + b"\n"


# -- the REST API -----------------------------------------------------------------------------------------


def test_files_jobs_and_tenant_isolation(api):
    client, h, _ = api
    r = _upload(client, h["alice"], _jsonl(ROWS))
    assert r.status_code == 200, r.text
    f = r.json()
    assert (f["num_rows"], f["format"], f["filename"], f["object"]) == (
        6,
        "prompt_completion",
        "train.jsonl",
        "file",
    )
    assert client.get(f"/v1/files/{f['id']}", headers=h["alice"]).json() == f
    # bob sees neither alice's file nor her jobs: the same 404 as for an id that does not exist
    r_other = client.get(f"/v1/files/{f['id']}", headers=h["bob"])
    r_none = client.get("/v1/files/file-" + "0" * 24, headers=h["bob"])
    assert r_other.status_code == r_none.status_code == 404
    assert _error(r_other).replace(f["id"], "X") == _error(r_none).replace("file-" + "0" * 24, "X")
    assert client.get("/v1/files", headers=h["bob"]).json()["data"] == []

    body = {
        "training_file": f["id"],
        "lorafleet": {"adapter": {"rank": 4}},
        "hyperparameters": {"n_epochs": 1},
        "suffix": "ab-1",
    }
    r = client.post("/v1/fine_tuning/jobs", headers=h["alice"], json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    assert (
        job["status"] == "validating_files"
        and job["lorafleet"]["adapter"]["rank"] == 4
        and job["fine_tuned_model"] is None
    )
    assert job["model"] == "tiny-model" and job["organization_id"] == "alice"
    # the legacy hyperparameters are a supervised method; "auto" is the documented default
    assert job["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": {"batch_size": 8, "n_epochs": 1, "learning_rate_multiplier": 1.0}},
        "dpo": None,
        "kto": None,
    }
    # a job naming another tenant's file: refused, with the same words as for a missing file
    r = client.post("/v1/fine_tuning/jobs", headers=h["bob"], json={"training_file": f["id"]})
    assert r.status_code == 400 and "does not exist" in _error(r)
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=h["bob"]).status_code == 404
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=h["bob"]).status_code == 404
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=h["bob"]).status_code == 404
    assert client.get("/v1/fine_tuning/jobs", headers=h["bob"]).json()["data"] == []

    # the file is in use: deleting it is a conflict until the job is cancelled
    r = client.delete(f"/v1/files/{f['id']}", headers=h["alice"])
    assert r.status_code == 409 and job["id"] in _error(r)
    r = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=h["alice"])
    assert r.json()["status"] == "cancelled"
    r = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=h["alice"])
    assert r.status_code == 409 and "already cancelled" in _error(r)
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?order=asc", headers=h["alice"]).json()[
        "data"
    ]
    assert [e["message"] for e in events] == ["Created fine-tuning job", "Job cancelled by the user"]
    assert client.delete(f"/v1/files/{f['id']}", headers=h["alice"]).json()["deleted"] is True
    assert client.get(f"/v1/files/{f['id']}", headers=h["alice"]).status_code == 404
    # an adapter of a job that did not succeed is not downloadable
    adapter_id = f"adapter-ab-1-{'0' * 16}"
    assert client.get(f"/v1/adapters/{adapter_id}/download", headers=h["alice"]).status_code == 404


def test_job_pagination(api):
    client, h, _ = api
    fid = _upload(client, h["alice"], _jsonl(ROWS)).json()["id"]
    ids = [
        client.post("/v1/fine_tuning/jobs", headers=h["alice"], json={"training_file": fid}).json()["id"]
        for _ in range(5)
    ]
    got, after = [], None
    while True:
        q = f"?limit=2{'&after=' + after if after else ''}"
        page = client.get(f"/v1/fine_tuning/jobs{q}", headers=h["alice"]).json()
        got += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert got == ids[::-1]


@pytest.mark.parametrize(
    ("headers", "expect"),
    [
        ({}, "missing API token"),
        ({"Authorization": "Basic abc"}, "malformed Authorization header"),
        ({"Authorization": "Bearer lft_wrong"}, "invalid or revoked API token"),
    ],
)
def test_missing_or_wrong_token_is_401(api, headers, expect):
    client, _, _ = api
    for method, path in [
        ("GET", "/v1/files"),
        ("GET", "/v1/fine_tuning/jobs"),
        ("POST", "/v1/fine_tuning/jobs"),
    ]:
        r = client.request(method, path, headers=headers, json={})
        assert r.status_code == 401, (path, r.text)
        assert expect in _error(r) and r.headers["www-authenticate"] == "Bearer"


def test_bad_input_is_4xx_with_clear_messages(api):
    client, h, _ = api
    hh = h["alice"]
    # malformed JSONL: the line is named
    r = _upload(client, hh, _jsonl(ROWS[:2]) + b'{"prompt": "x", "completion": }\n')
    assert r.status_code == 400 and "line 3: invalid JSON" in _error(r)
    assert len(r.json()["error"]["errors"]) == 1 and r.json()["error"]["param"] == "file"
    # oversize upload: refused from Content-Length before the body is read, and while streaming without it
    big = _jsonl(ROWS * 40)
    r = _upload(client, hh, big)
    assert r.status_code == 413 and "upload limit of 4096 bytes" in _error(r)
    huge = b"x" * (4096 + 70000)
    r = client.post(
        "/v1/files", headers={**hh, "Content-Type": "multipart/form-data; boundary=b"}, content=huge
    )
    assert r.status_code == 413 and "larger than the limit" in _error(r)

    def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        for _ in range(20):
            yield b"y" * 8192

    r = client.post(
        "/v1/files", headers={**hh, "Content-Type": "multipart/form-data; boundary=b"}, content=chunks()
    )
    assert r.status_code == 413, r.text
    # not multipart, no file part, empty file, mixed formats
    assert client.post("/v1/files", headers=hh, json={"a": 1}).status_code == 400
    r = client.post("/v1/files", headers=hh, files={"other": ("a", b"x")})
    assert r.status_code == 400 and "'file'" in _error(r)
    assert "no rows" in _error(_upload(client, hh, b"\n\n"))
    r = _upload(client, hh, _jsonl([ROWS[0], {"text": "plain"}]))
    assert r.status_code == 400 and "mix data formats" in _error(r)

    fid = _upload(client, hh, _jsonl(ROWS)).json()["id"]
    lf = "lorafleet"
    cases = [
        ({"training_file": fid, lf: {"adapter": {"rnk": 8}}}, 400, "lorafleet.adapter: unknown field 'rnk' (did you mean 'rank'?)"),
        ({"training_file": fid, "learning_rate": 1e-3}, 400, "unknown field 'learning_rate' (it belongs in learning_rate_multiplier"),
        ({"training_file": fid, "hyperparameters": {"max_steps": 3}}, 400, "'max_steps' (it belongs in lorafleet.training)"),
        ({"training_file": fid, "hyperparameters": {"learning_rate_multiplier": -1}}, 400, "learning_rate_multiplier must be 'auto' or in (0, 100]"),
        ({"training_file": fid, "hyperparameters": {"n_epochs": "many"}}, 400, "hyperparameters.n_epochs"),
        ({"training_file": fid, "hyperparameters": {}, "method": {"type": "supervised"}}, 400, "not both"),
        ({"training_file": fid, "method": {"type": "reinforcement"}}, 400, "reinforcement fine-tuning is not supported"),
        ({"training_file": fid, "method": {"type": "dpo", "supervised": {}}}, 400, "method.supervised is given but method.type is 'dpo'"),
        ({"training_file": fid, "seed": -1}, 400, "seed"),
        ({"training_file": fid, "metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
        ({"training_file": fid, lf: {"preference": {"objective": "orpo"}}}, 400, "dpo jobs only"),
        ({"training_file": fid, lf: {"adapter": {"target_modules": ["q_proj", "q_proj"]}}}, 400, "twice"),
        ({"training_file": fid, lf: {"adapter": {"target_modules": ["lm_head"]}}}, 400, "target_modules.0"),
        ({"training_file": "../../etc/passwd"}, 400, "training_file: String should match pattern"),
        ({}, 400, "training_file: required field is missing"),
        ({"training_file": "file-" + "0" * 24}, 400, "does not exist: upload it"),
        ({"training_file": fid, "model": "gpt-9"}, 400, "is not served here"),
        ({"training_file": fid, "hyperparameters": {"batch_size": 6}, lf: {"training": {"micro_batch_size": 4}}}, 400, "micro_batch_size 4 does not divide"),
        ({"training_file": fid, lf: {"training": {"max_seq_len": 9000}}}, 400, "max-tokens-per-micro-batch"),
        ({"training_file": fid, "suffix": "../x"}, 400, "suffix: String should match pattern"),
    ]  # fmt: skip
    for body, status, expect in cases:
        r = client.post("/v1/fine_tuning/jobs", headers=hh, json=body)
        assert r.status_code == status, (body, r.text)
        assert expect in _error(r), (body, r.text)
    r = client.post(
        "/v1/fine_tuning/jobs", headers={**hh, "Content-Type": "application/json"}, content=b"{oops"
    )
    assert r.status_code == 400 and "not valid JSON" in _error(r)
    # a preference file cannot train an SFT job: the engine's own config rule, answered at creation
    pref = _upload(client, hh, _jsonl([{"prompt": "p", "chosen": "a", "rejected": "b"}])).json()
    assert pref["format"] == "preference"
    r = client.post("/v1/fine_tuning/jobs", headers=hh, json={"training_file": pref["id"]})
    assert r.status_code == 400 and "preference" in _error(r) and "training_file" in _error(r)
    assert pref["id"] in _error(r) and ".train" not in _error(r)  # the user's file id, not internal names
    # the other way round too; a DPO job on the preference file is accepted
    r = client.post(
        "/v1/fine_tuning/jobs", headers=hh, json={"training_file": fid, "method": {"type": "dpo"}}
    )
    assert r.status_code == 400 and "type 'dpo' cannot train on" in _error(r) and "'preference'" in _error(r)
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}
    r = client.post("/v1/fine_tuning/jobs", headers=hh, json={"training_file": pref["id"], "method": dpo})
    assert r.status_code == 200 and r.json()["method"]["dpo"]["hyperparameters"]["beta"] == 0.2
    assert r.json()["lorafleet"]["preference"]["objective"] == "dpo"
    tr = {"eval_every_steps": 5}
    r = client.post("/v1/fine_tuning/jobs", headers=hh, json={"training_file": fid, lf: {"training": tr}})
    assert r.status_code == 400 and "needs a validation_file" in _error(r)
    tr = {"eval_every_steps": 5, "early_stopping_patience": 2}
    r = client.post(
        "/v1/fine_tuning/jobs",
        headers=hh,
        json={"training_file": fid, "validation_file": fid, lf: {"training": tr}},
    )
    assert r.status_code == 200, r.text
    # ids that are not ids never reach the store or the disk
    for path in [
        "/v1/files/..%2F..%2Fetc",
        "/v1/fine_tuning/jobs/ftjob-zz",
        "/v1/adapters/adapter-..%2Fx/download",
    ]:
        r = client.get(path, headers=hh)
        assert r.status_code in (400, 404), (path, r.text)
        _error(r)
    r = client.get("/v1/fine_tuning/jobs?limit=1000", headers=hh)
    assert r.status_code == 400 and "limit" in _error(r)


def test_dashboard_is_served_without_external_resources(api):
    client, _, _ = api
    html = client.get("/").text
    assert '<table id="jobs">' in html and 'src="/dashboard.js"' in html and 'src="/chart.js"' in html
    for path in ("/", "/dashboard.js", "/chart.js", "/dashboard.css", "/docs", "/redoc"):
        r = client.get(path)
        text = r.text.replace("http://www.w3.org/2000/svg", "")
        assert (
            r.status_code == 200 and "http://" not in text and "https://" not in text and "//cdn" not in text
        ), path
    # /docs and /redoc load their bundles from this server (the browser test renders them offline)
    for page, assets in (
        ("/docs", ["swagger-ui-bundle.js", "swagger-ui.css"]),
        ("/redoc", ["redoc.standalone.js"]),
    ):
        text = client.get(page).text
        for name in assets:
            assert f"/docs-assets/{name}" in text, (page, name)
            r = client.get(f"/docs-assets/{name}")
            assert r.status_code == 200 and len(r.content) > 100_000, name
    r = client.get("/docs-assets/../../etc/passwd")
    assert r.status_code == 404 and "/docs" in _error(r)
    assert client.get("/docs-assets/nothing.js").status_code == 404
    assert client.get("/healthz").json()["worker"]["alive"] is False
    schema = client.get("/openapi.json").json()
    assert {"/v1/files", "/v1/fine_tuning/jobs", "/v1/adapters/{adapter_id}/download"} <= set(schema["paths"])


# -- architecture and command line ------------------------------------------------------------------------


def test_api_process_never_imports_torch(tmp_path):
    """Build the app and answer real requests with an import hook that makes importing torch fail."""
    code = textwrap.dedent(
        f"""
        import importlib.abc, json, sys
        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("torch", "transformers", "peft"):
                    raise ImportError("the API process imported " + name)
        sys.meta_path.insert(0, NoTorch())
        import lorafleet.cli, lorafleet.service.server, lorafleet.service.commands
        from fastapi.testclient import TestClient
        from lorafleet.service import auth
        from lorafleet.service.app import ServiceSettings, create_app
        app = create_app(ServiceSettings({str(tmp_path / "d")!r}, "model"))
        _, secret = auth.create_token(app.state.store, "t")
        c = TestClient(app)
        h = {{"Authorization": "Bearer " + secret}}
        f = c.post("/v1/files", headers=h, files={{"file": ("a.jsonl", b'{{"text": "hi"}}\\n')}}).json()
        j = c.post("/v1/fine_tuning/jobs", headers=h, json={{"training_file": f["id"]}})
        assert j.status_code == 200, j.text
        assert c.get("/v1/fine_tuning/jobs", headers=h).status_code == 200
        lorafleet.cli.build_parser()
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft"))
        print(json.dumps(bad))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow  # a CLI in a fresh interpreter: over 3 s
def test_tokens_command(tmp_path):
    data = tmp_path / "data"
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "lorafleet", "tokens", *a, "--data-dir", str(data)],
        capture_output=True,
        text=True,
    )
    r = run("create", "--tenant", "alice")
    assert r.returncode == 0, r.stderr
    secret = r.stdout.strip()
    assert secret.startswith("lft_")
    store = SQLiteStore(DataDir(data).db)
    assert auth.authenticate(store, f"Bearer {secret}") == "alice"
    listed = run("list")
    assert "alice" in listed.stdout and secret not in listed.stdout
    token_id = store.list_tokens("alice")[0].id
    assert run("revoke", token_id).returncode == 0
    assert store.tenant_for_token_hash(auth.hash_token(secret)) is None
    r = run("create", "--tenant", "Bad Name")
    assert r.returncode == 2 and "not a valid name" in r.stderr
    r = run("revoke", "tok-nope")
    assert r.returncode == 2 and "no active token" in r.stderr


def test_worker_stores_each_step_before_checkpointing_it(tmp_path, tiny_llama_dir, monkeypatch):
    """A worker killed right after a checkpoint is written must not have lost that step's metrics: the
    resumed job starts after the checkpoint and never trains (nor reports) that step again."""
    from lorafleet.service.jobspec import EngineSettings
    from lorafleet.service.worker import Worker
    from lorafleet.train import task as task_mod

    app = create_app(ServiceSettings(tmp_path / "data", str(tiny_llama_dir)))
    store, dd = app.state.store, DataDir(tmp_path / "data")
    _, secret = auth.create_token(store, "alice")
    h = {"Authorization": f"Bearer {secret}"}
    with TestClient(app) as client:
        fid = _upload(client, h, _jsonl(ROWS)).json()["id"]
        tr = {"max_steps": 4, "save_every_steps": 2, "max_seq_len": 32}
        body = {"training_file": fid, "hyperparameters": {"batch_size": 2}, "lorafleet": {"training": tr}}
        r = client.post("/v1/fine_tuning/jobs", headers=h, json=body)
        job_id = r.json()["id"]

    stored_at_save = []
    real_save = task_mod.save_checkpoint

    def save_and_look(root, step, *args, **kwargs):
        events, _ = store.list_events(job_id, None, 1000, True)
        stored_at_save.append((step, [e.step for e in events if e.type == "metrics"]))
        return real_save(root, step, *args, **kwargs)

    monkeypatch.setattr(task_mod, "save_checkpoint", save_and_look)
    worker = Worker(store, dd, EngineSettings(base_model=str(tiny_llama_dir)), poll_interval=0.0)
    worker._load_engine()
    deadline = time.monotonic() + 120
    while store.get_job_any(job_id).status != "succeeded" and time.monotonic() < deadline:
        worker.sync()
        worker._step()
    assert store.get_job_any(job_id).status == "succeeded", store.get_job_any(job_id)
    assert stored_at_save == [(2, [1, 2]), (4, [1, 2, 3, 4])]


def test_worker_command_refuses_bad_flags_clearly(tmp_path):
    def worker(*args):
        return subprocess.run(
            [sys.executable, "-m", "lorafleet", "worker", "--data-dir", str(tmp_path / "d"), *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    r = worker("--base-model", str(tmp_path), "--nproc", "0")  # --nproc P > 1 runs (test_worker_nproc.py)
    assert r.returncode == 2 and "--nproc" in r.stderr, r.stderr
    r = worker("--base-model", str(tmp_path / "missing"))
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr
    r = worker("--base-model", str(tmp_path), "--store", "mysql://x/y")
    assert r.returncode == 2 and "sqlite:///PATH or postgresql://" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_over_quota_requests_get_429_with_retry_after_naming_the_quota(api, tmp_path):
    client, h, app = api
    data = _jsonl(ROWS)
    fid = _upload(client, h["alice"], data).json()["id"]
    # quotas set through the CLI, on the store the API uses
    r = subprocess.run(
        [sys.executable, "-m", "lorafleet", "tenants", "set", "alice", "--max-queued-jobs", "1",
         "--max-stored-mb", str(1.5 * len(data) / 2**20), "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    body = {"training_file": fid, "lorafleet": {"training": {"max_steps": 2}}}
    assert client.post("/v1/fine_tuning/jobs", headers=h["alice"], json=body).status_code == 200
    r = client.post("/v1/fine_tuning/jobs", headers=h["alice"], json=body)
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert "max_queued_jobs" in _error(r) and r.json()["error"]["code"] == "quota_exceeded"
    assert (
        len(client.get("/v1/fine_tuning/jobs", headers=h["alice"]).json()["data"]) == 1
    )  # nothing half-made
    r = _upload(client, h["alice"], data)  # a second copy passes 1.5x the file's size
    assert r.status_code == 429 and "max_stored_bytes" in _error(r) and r.headers["retry-after"]
    assert len(client.get("/v1/files", headers=h["alice"]).json()["data"]) == 1
    assert len(list((tmp_path / "data" / "files").iterdir())) == 1  # the refused bytes are not kept
    # bob has no quota
    fid_b = _upload(client, h["bob"], data).json()["id"]
    for _ in range(2):
        r = client.post("/v1/fine_tuning/jobs", headers=h["bob"], json={**body, "training_file": fid_b})
        assert r.status_code == 200


def test_jobs_for_a_base_model_the_fleet_announces_go_to_its_workers(api):
    from lorafleet.service.store import WorkerRecord

    client, h, app = api
    store = app.state.store
    fid = _upload(client, h["alice"], _jsonl(ROWS)).json()["id"]
    body = {"training_file": fid, "model": "qwen3-0.6b", "lorafleet": {"training": {"max_steps": 2}}}
    r = client.post("/v1/fine_tuning/jobs", headers=h["alice"], json=body)
    assert r.status_code == 400 and "'tiny-model'" in _error(r)  # no worker serves it yet
    store.heartbeat(WorkerRecord("gpu-b-0", "host-b", 1, "qwen3-0.6b", "ready", 8, 4096))
    r = client.post("/v1/fine_tuning/jobs", headers=h["alice"], json=body)
    assert r.status_code == 200 and r.json()["model"] == "qwen3-0.6b", r.text
    own = client.post("/v1/fine_tuning/jobs", headers=h["alice"], json={**body, "model": None}).json()
    assert own["model"] == "tiny-model"
    for j in store.jobs_with_status(["validating_files"]):
        assert store.transition(j.id, "queued", ["validating_files"])
    assert [j.id for j, _ in store.claim_jobs("gpu-a-0", "tiny-model", 5, 30.0)] == [own["id"]]
    assert [j.id for j, _ in store.claim_jobs("gpu-b-0", "qwen3-0.6b", 5, 30.0)] == [r.json()["id"]]
    workers = client.get("/healthz").json()["workers"]
    assert [(w["id"], w["base_model"], w["alive"]) for w in workers] == [("gpu-b-0", "qwen3-0.6b", True)]
    # /v1/models lists the fleet's base models, this server's first
    models = client.get("/v1/models", headers=h["alice"]).json()["data"]
    assert [m["id"] for m in models if m["owned_by"] == "lorafleet"] == ["tiny-model", "qwen3-0.6b"]
    assert client.get("/v1/models/qwen3-0.6b", headers=h["alice"]).json()["parent"] is None
    assert client.delete("/v1/models/qwen3-0.6b", headers=h["alice"]).status_code == 403


def test_jobs_that_cannot_resume_free_their_slot(tmp_path, tiny_llama_dir):
    """Issue 19 item 1 through the API: with 2 slots, a job whose only checkpoint is truncated starts from
    scratch, a job whose checkpoint belongs to another run fails with that reason, and a third job runs."""
    import torch

    from lorafleet.service.jobspec import EngineSettings
    from lorafleet.service.store import CheckpointRecord
    from lorafleet.service.worker import Worker
    from lorafleet.train.checkpoint import save_checkpoint

    app = create_app(ServiceSettings(tmp_path / "data", str(tiny_llama_dir)))
    store, dd = app.state.store, DataDir(tmp_path / "data")
    _, secret = auth.create_token(store, "alice")
    h = {"Authorization": f"Bearer {secret}"}
    with TestClient(app) as client:
        fid = _upload(client, h, _jsonl(ROWS)).json()["id"]
        tr = {"max_steps": 2, "save_every_steps": 1, "max_seq_len": 32}
        body = {"training_file": fid, "hyperparameters": {"batch_size": 2}, "lorafleet": {"training": tr}}
        ids = [client.post("/v1/fine_tuning/jobs", headers=h, json=body).json()["id"] for _ in range(3)]
    # faults planted before the worker starts: a truncated checkpoint, and one of an incompatible run
    optim = {"optimizer": {}, "scheduler": {}}
    tensors = {"w": torch.zeros(2)}
    bad = save_checkpoint(dd.checkpoint_dir(ids[0]), 1, tensors, optim, {"fingerprint": {}})
    (bad / "adapter.safetensors").write_bytes(b"\0" * 4)
    other = save_checkpoint(dd.checkpoint_dir(ids[1]), 1, tensors, optim, {"fingerprint": {"seed": -1}})
    # recorded in the store, as the worker that wrote them would have: a worker removes checkpoints the
    # store never recorded before it resumes (a worker that lost its lease may have left them)
    for jid, path in ((ids[0], bad), (ids[1], other)):
        store.add_checkpoint(CheckpointRecord(jid, 1, str(path), time.time()))
    worker = Worker(store, dd, EngineSettings(str(tiny_llama_dir), max_concurrent_tasks=2), poll_interval=0.0)
    worker._load_engine()
    deadline = time.monotonic() + 120
    finished = ("succeeded", "failed", "cancelled")
    while time.monotonic() < deadline and any(store.get_job_any(j).status not in finished for j in ids):
        worker.sync()
        worker._step()
    jobs = [store.get_job_any(j) for j in ids]
    assert [j.status for j in jobs] == ["succeeded", "failed", "succeeded"], jobs
    assert "incompatible run" in str(jobs[1].error), jobs[1]
