"""Fault injection through the HTTP API (FastAPI TestClient): hostile uploads and loosely typed requests.

Every case must be a 4xx naming the line or the field, never a 5xx (issue 19, items 3 and 8).
"""

from __future__ import annotations

import json

import pytest

from helpers.service import ROWS, api_client, error_message, jsonl, upload


@pytest.fixture
def api(tmp_path):
    with api_client(tmp_path) as c:
        yield c


def test_deeply_nested_row_is_a_400_naming_the_line(api):
    client, h, _ = api
    deep = "[" * 1000 + "]" * 1000
    data = jsonl(ROWS[:2]) + ('{"text": "x", "extra": ' + deep + "}\n").encode()
    r = upload(client, h["alice"], data)
    assert r.status_code == 400, r.text
    msg = error_message(r)
    assert "line 3" in msg and "nested deeper than" in msg, msg
    # deep, but within the bound, is still a clear format error, not a 500
    r = upload(client, h["alice"], jsonl(ROWS[:1]) + b'{"text": ' + b"[" * 50 + b"]" * 50 + b"}\n")
    assert r.status_code == 400 and "line 2" in error_message(r)


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "ok \\ude00 then"])
def test_lone_surrogate_is_rejected_with_the_line(api, escape):
    client, h, _ = api
    bad = '{"prompt": "hi", "completion": "' + escape + '"}\n'
    r = upload(client, h["alice"], jsonl(ROWS[:3]) + bad.encode())
    assert r.status_code == 400, r.text
    msg = error_message(r)
    assert "line 4" in msg and "surrogate" in msg, msg
    # a valid pair (an emoji written as escapes) is fine
    good = '{"prompt": "hi", "completion": "\\ud83d\\ude00"}\n'
    assert upload(client, h["alice"], jsonl(ROWS[:3]) + good.encode()).status_code == 200


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"lorafleet": {"adapter": {"rank": True}}}, "lorafleet.adapter.rank"),
        ({"lorafleet": {"adapter": {"rank": "8"}}}, "lorafleet.adapter.rank"),
        ({"lorafleet": {"adapter": {"alpha": "16"}}}, "lorafleet.adapter.alpha"),
        ({"lorafleet": {"adapter": {"use_rslora": 1}}}, "lorafleet.adapter.use_rslora"),
        ({"lorafleet": {"training": {"max_steps": 3.0}}}, "lorafleet.training.max_steps"),
        ({"lorafleet": {"priority": False}}, "lorafleet.priority"),
        ({"hyperparameters": {"batch_size": "8"}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"n_epochs": True}}, "hyperparameters.n_epochs"),
    ],
)
def test_loose_types_are_400s_naming_the_field(api, settings, field):
    client, h, _ = api
    fid = upload(client, h["alice"], jsonl(ROWS)).json()["id"]
    r = client.post("/v1/fine_tuning/jobs", headers=h["alice"], json={"training_file": fid, **settings})
    assert r.status_code == 400, r.text
    assert field in error_message(r), error_message(r)


def test_strict_types_still_accept_the_right_ones(api):
    client, h, _ = api
    fid = upload(client, h["alice"], jsonl(ROWS)).json()["id"]
    body = {
        "training_file": fid,
        "hyperparameters": {"batch_size": 2, "n_epochs": 1, "learning_rate_multiplier": 2},
        "lorafleet": {"adapter": {"rank": 4, "alpha": 8, "use_rslora": True}, "training": {"max_steps": 2}},
    }
    r = client.post("/v1/fine_tuning/jobs", headers=h["alice"], json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["lorafleet"]["adapter"]["rank"] == 4 and job["hyperparameters"]["batch_size"] == 2
    assert json.loads(json.dumps(job))["lorafleet"]["adapter"]["alpha"] == 8


def test_upload_while_storage_cannot_be_written_is_a_503_with_retry_after(api, monkeypatch):
    """A disk fault (full, I/O error, the folder gone): 503 + Retry-After, no server path; then it works."""
    import errno
    import os

    client, h, app = api
    files = app.state.service.dd.files
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device", "/srv/secret/data/files/x.tmp")

    monkeypatch.setattr(os, "fsync", full_disk)
    r = upload(client, h["alice"], jsonl(ROWS))
    assert r.status_code == 503, r.text
    assert int(r.headers["Retry-After"]) > 0
    msg = error_message(r)
    assert "retry later" in msg and "/" not in msg, msg
    assert r.json()["error"]["code"] == "storage_unavailable"
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert client.get("/v1/files", headers=h["alice"]).json()["data"] == []  # nothing half-kept
    assert not any(files.iterdir())
    assert upload(client, h["alice"], jsonl(ROWS)).status_code == 200  # the disk is back: it works
