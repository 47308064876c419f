"""Property-based run of every API operation against its own OpenAPI schema (schemathesis): whatever the
client sends, the server never answers 5xx, and its answers match the statuses and bodies the schema
declares. Examples are bounded so the file runs in seconds."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from lorafleet.service import auth
from lorafleet.service.app import ServiceSettings, create_app


def _app_and_state():
    # Built at import: schemathesis makes one test per operation from the schema at collection time.
    # (Its ``from_fixture`` loader does not work with the pytest installed here.)
    root = Path(tempfile.mkdtemp(prefix="lorafleet-schema-"))
    atexit.register(shutil.rmtree, root, True)
    app = create_app(ServiceSettings(root, "tiny-model", max_upload_bytes=64 * 1024))
    _, secret = auth.create_token(app.state.store, "fuzz")
    headers = {"Authorization": f"Bearer {secret}"}
    # real objects, so that generated requests also meet existing ids and not only 404s
    client = TestClient(app)
    f = client.post("/v1/files", headers=headers, files={"file": ("a.jsonl", b'{"text": "hello"}\n')}).json()
    client.post("/v1/fine_tuning/jobs", headers=headers, json={"training_file": f["id"]})
    return app, headers


_APP, _HEADERS = _app_and_state()
schema = schemathesis.openapi.from_asgi("/openapi.json", _APP)


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors_and_schema_conformance(case):
    case.headers = {**(case.headers or {}), **_HEADERS}
    response = case.call()
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )
    assert response.status_code < 500, response.text
    if response.status_code >= 400:  # every error is the API's error shape with a message
        assert json.loads(response.text)["error"]["message"]
