"""The API's models, pause/resume and inference routes without a worker: ids, tenants, states and the 4xx/503
answers (the live paths are in test_service_openai.py)."""

from __future__ import annotations

import pytest

from helpers.service import ROWS, api_client, error_message, jsonl, upload


@pytest.fixture()
def api(tmp_path):
    with api_client(tmp_path) as got:
        yield got


def test_models_pause_resume_and_inference_errors_without_a_worker(api):
    client, h, _ = api
    fid = upload(client, h["alice"], jsonl(ROWS)).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", headers=h["alice"], json={"training_file": fid}).json()
    base = job["model"]
    models = client.get("/v1/models", headers=h["alice"]).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [base]
    assert client.get(f"/v1/models/{base}", headers=h["bob"]).json()["owned_by"] == "lorafleet"
    r = client.get("/v1/models/adapter-" + "0" * 16, headers=h["alice"])
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.delete(f"/v1/models/{base}", headers=h["alice"]).status_code == 403
    # pause before the job started: paused at once; resume: queued again; only paused jobs resume
    jid = job["id"]
    assert client.post(f"/v1/fine_tuning/jobs/{jid}/pause", headers=h["bob"]).status_code == 404
    assert client.post(f"/v1/fine_tuning/jobs/{jid}/pause", headers=h["alice"]).json()["status"] == "paused"
    assert client.post(f"/v1/fine_tuning/jobs/{jid}/pause", headers=h["alice"]).status_code == 409
    assert client.post(f"/v1/fine_tuning/jobs/{jid}/resume", headers=h["alice"]).json()["status"] == "queued"
    assert client.post(f"/v1/fine_tuning/jobs/{jid}/resume", headers=h["alice"]).status_code == 409
    msgs = [{"role": "user", "content": "hi"}]
    r = client.post("/v1/chat/completions", headers=h["alice"], json={"model": base, "messages": msgs})
    assert r.status_code == 503 and "worker is not available" in error_message(r)
    for body, expect in [
        ({"model": base, "messages": msgs, "n": 2}, "n"),
        ({"model": base, "messages": msgs, "temprature": 0}, "did you mean 'temperature'"),
        ({"model": base, "messages": msgs, "stop": ["a"] * 5}, "up to 4"),
        ({"model": base, "messages": []}, "messages"),
    ]:
        r = client.post("/v1/chat/completions", headers=h["alice"], json=body)
        assert r.status_code == 400 and expect in error_message(r), (body, r.text)
    r = client.post("/v1/completions", headers=h["bob"], json={"model": "adapter-" + "1" * 16, "prompt": "x"})
    assert r.status_code == 404
