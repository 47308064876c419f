"""Helpers of the service tests: an API client over a fresh data folder (no worker), uploads, errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi.testclient import TestClient

from lorafleet.service import auth
from lorafleet.service.app import ServiceSettings, create_app

__all__ = ["ROWS", "api_client", "error_message", "jsonl", "upload"]

ROWS = [{"prompt": f"what is {i} plus {i}?", "completion": f" {2 * i}"} for i in range(6)]


def jsonl(rows) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


@contextmanager
def api_client(tmp_path) -> Iterator[tuple[TestClient, dict[str, dict[str, str]], object]]:
    """(client, {tenant: headers} for alice and bob, app) over ``tmp_path/data``, upload limit 4 KiB."""
    app = create_app(ServiceSettings(tmp_path / "data", str(tmp_path / "tiny-model"), max_upload_bytes=4096))
    headers = {}
    for tenant in ("alice", "bob"):
        _, secret = auth.create_token(app.state.store, tenant)
        headers[tenant] = {"Authorization": f"Bearer {secret}"}
    with TestClient(app) as client:
        yield client, headers, app


def upload(client, headers, data: bytes, name="train.jsonl"):
    return client.post("/v1/files", headers=headers, files={"file": (name, data, "application/jsonl")})


def error_message(r) -> str:
    """The message of an error response, checking it has the API's error shape."""
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["message"], body
    return body["error"]["message"]
