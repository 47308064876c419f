"""The dashboard in a real headless browser (Playwright driving the system's Chromium) against a real
``lorafleet serve``: a job appears, its training curve grows and its validation loss is drawn; a job that
arrives later gets its own colour while the first keeps its own; the job page shows its events, checkpoints,
hyper-parameters and tokens/s; the workers table shows both workers of a fleet of two (the server's and a
``lorafleet worker`` on the same store) with their heartbeat, and the second as not alive once stopped; a
cancel from the page cancels the job; the page has no horizontal overflow at 1400 px and 400 px and the chart is whole at 400 px; /docs
and /redoc render with every request to other hosts blocked. Screenshots go to ``$LORAFLEET_TEST_ARTIFACTS``
(default: the test's tmp folder) and are printed.

Oracles: the API's own answers (job ids, statuses, step counts, checkpoints) and the browser's layout
(``scrollWidth`` against the window, the chart's bounding box).

Chromium: Debian's ``chromium`` (``.ci/run`` installs it through ``scripts/ensure_chromium.sh``), or any
Chrome named by ``LORAFLEET_CHROMIUM``. Without one the test is skipped with how to get one; under CI (``CI``
set) it fails instead, so a CI without a browser cannot pass by skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from helpers import REPO
from helpers.serve import Server
from lorafleet.service import auth
from lorafleet.service.files import DataDir
from lorafleet.service.store import SQLiteStore

pytestmark = pytest.mark.slow

QA = [{"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(16)]
_HOW = (
    "install Debian's Chromium (apt-get install chromium, or bash scripts/ensure_chromium.sh as root) or set "
    "LORAFLEET_CHROMIUM to a Chrome/Chromium binary"
)


def _chromium() -> str:
    path = (
        os.environ.get("LORAFLEET_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "playwright is not installed (pip install -e '.[test]')"
    if path is None:
        problem = f"no Chromium found: {_HOW}"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test cannot run in CI: {problem}")
        pytest.skip(problem)
    return path


def _artifacts(tmp_path: Path) -> Path:
    out = Path(os.environ.get("LORAFLEET_TEST_ARTIFACTS", tmp_path / "artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _job_body(fid: str, vid: str | None, steps: int, **training) -> dict:
    tr = {"max_steps": steps, "max_seq_len": 48, **training}
    body = {"training_file": fid, "hyperparameters": {"batch_size": 2}, "lorafleet": {"training": tr}}
    if vid:
        body["validation_file"] = vid
    return body


def _no_overflow(page, width: int) -> None:
    page.set_viewport_size({"width": width, "height": 900})
    page.wait_for_timeout(400)  # the resize handler redraws after 100 ms
    sw, iw = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert sw <= iw == width, f"horizontal overflow at {width} px: the page is {sw} px wide"


def _chart_whole(page, selector: str, width: int) -> None:
    box = page.locator(selector).bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, (width, box)
    assert box["width"] >= width - 80, f"the chart uses {box['width']} of {width} px"


def _wait_for(cond, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture()
def server(tmp_path, tiny_llama_dir):
    """(chromium path, the running server, alice's token); skipped before the server starts without a browser."""
    chromium = _chromium()
    data = tmp_path / "data"
    store = SQLiteStore(DataDir(data).create().db)
    token = auth.create_token(store, "alice")[1]
    srv = Server(tiny_llama_dir, data).start()
    # a second worker on the same store: a fleet of two (its log beside the server's)
    with open(tmp_path / "worker-2.log", "ab") as log:
        second = subprocess.Popen(
            [sys.executable, "-m", "lorafleet", "worker", "--data-dir", str(data), "--base-model", str(tiny_llama_dir),
             "--worker-id", "second-worker", "--device", "cpu", "--num-threads", "1", "--poll-interval", "0.1",
             "--no-inference"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
    try:
        yield chromium, srv, token, second
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
        srv.stop()


def test_dashboard_in_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium, srv, token, second = server
    art = _artifacts(tmp_path)
    api = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    up = lambda name, rows: api.post(  # noqa: E731
        "/v1/files", files={"file": (name, "".join(json.dumps(r) + "\n" for r in rows).encode())}
    ).json()["id"]
    fid, vid = up("qa.jsonl", QA), up("valid.jsonl", QA[:4])
    # a long job (it runs until the page cancels it), evaluated and checkpointed every 10 steps
    long_job = api.post(
        "/v1/fine_tuning/jobs", json=_job_body(fid, vid, 100_000, eval_every_steps=10, save_every_steps=10)
    ).json()["id"]
    shots = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            js_errors: list[str] = []
            page.on("pageerror", lambda e: js_errors.append(str(e)))
            page.on("console", lambda m: js_errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{srv.url}/#token={token}")
            train = page.locator(f'#chart polyline.train[data-job="{long_job}"]')
            valid = page.locator(f'#chart polyline.valid[data-job="{long_job}"]')
            try:
                train.wait_for(timeout=90_000)
            finally:
                assert not js_errors, js_errors
            n0 = int(train.get_attribute("data-points"))
            # the curve grows while it trains, and the validation curve is drawn (two evaluations at least)
            _wait_for(lambda: int(train.get_attribute("data-points")) > n0, "the training curve to grow")
            _wait_for(
                lambda: valid.count() and int(valid.get_attribute("data-points")) >= 2, "validation loss"
            )
            assert (
                page.locator(f'#chart circle.valid-dot[stroke="{train.get_attribute("stroke")}"]').count()
                >= 2
            )
            row = page.locator(f'tr.job-row[data-job="{long_job}"]')
            assert row.locator("td.valid-loss").inner_text() != "-"
            colour = train.get_attribute("stroke")

            # a new job arrives: the first keeps its colour, the new one gets another
            short_job = api.post("/v1/fine_tuning/jobs", json=_job_body(fid, None, 6)).json()["id"]
            page.locator(f'tr.job-row[data-job="{short_job}"][data-status="succeeded"]').wait_for(
                timeout=90_000
            )
            short_line = page.locator(f'#chart polyline.train[data-job="{short_job}"]')
            _wait_for(
                lambda: short_line.count() and short_line.get_attribute("data-points") == "6", "6 points"
            )
            assert train.get_attribute("stroke") == colour
            assert short_line.get_attribute("stroke") != colour
            assert row.locator(".swatch").get_attribute("style") == f"background:{colour}"
            rows = page.locator("tr.job-row")
            assert [rows.nth(i).get_attribute("data-job") for i in range(rows.count())] == [
                short_job,
                long_job,
            ]

            # every worker of the fleet with its heartbeat; one that stops shows as not alive
            alive = page.locator('tr.worker-row[data-alive="true"]')
            _wait_for(lambda: alive.count() == 2, "two live workers")
            ids = {w["id"] for w in httpx.get(f"{srv.url}/healthz").json()["workers"]}
            assert {
                alive.nth(i).get_attribute("data-worker") for i in range(2)
            } == ids and "second-worker" in ids
            assert all(t.endswith(" s ago") for t in alive.locator("td.heartbeat").all_inner_texts())
            second.terminate()
            second.wait(60)
            page.locator('tr.worker-row[data-worker="second-worker"][data-alive="false"]').wait_for(
                timeout=30_000
            )
            assert "not alive" in page.locator('tr.worker-row[data-worker="second-worker"]').inner_text()
            _no_overflow(page, 1400)
            page.screenshot(path=str(art / "dashboard-1400.png"), full_page=True)
            shots.append(art / "dashboard-1400.png")
            _no_overflow(page, 400)
            _chart_whole(page, "#chart", 400)
            assert train.get_attribute("stroke") == colour
            page.screenshot(path=str(art / "dashboard-400.png"), full_page=True)
            shots.append(art / "dashboard-400.png")

            # the job page: events, checkpoints, hyper-parameters, tokens/s; a cancel from there
            page.set_viewport_size({"width": 1400, "height": 900})
            row.locator("a.job-link").click()
            page.locator("#job-view").wait_for(state="visible")
            page.locator("#job-checkpoints tr.checkpoint-row").first.wait_for(timeout=60_000)
            page.wait_for_timeout(2500)  # one more refresh: every list is current
            # while it trains: checkpoints every 10 steps, newest first (checked against the API after the cancel)
            shown = [
                int(t)
                for t in page.locator("#job-checkpoints tr.checkpoint-row td:first-child").all_inner_texts()
            ]
            assert shown and shown == sorted(shown, reverse=True) and all(t % 10 == 0 for t in shown), shown
            summary = dict(
                r.split("\t", 1) for r in page.locator("#job-summary tr").all_inner_texts() if "\t" in r
            )
            assert int(summary["tokens/s"].replace(",", "")) > 0, summary
            params = dict(r.split("\t", 1) for r in page.locator("#job-params tr").all_inner_texts())
            assert params["batch_size"] == "2" and params["training.eval_every_steps"] == "10", params
            shown_ids = [
                int(i.removeprefix("ftevent-"))
                for i in page.eval_on_selector_all(
                    "#job-events tr.event-row", "rs => rs.map(r => r.dataset.id)"
                )
            ]
            assert shown_ids == sorted(set(shown_ids), reverse=True)  # each event once, newest first
            events = page.locator("#job-events tr.event-row td:last-child").all_inner_texts()
            assert any("validation loss=" in e for e in events)
            # the page lists the newest 500 (MAX_EVENTS_SHOWN): the first event while there are fewer
            assert events[-1] == "Created fine-tuning job" or len(events) == 500, (len(events), events[-1])
            assert page.locator("#job-chart polyline.valid").count() == 1
            _no_overflow(page, 1400)
            page.screenshot(path=str(art / "job-1400.png"), full_page=True)
            _no_overflow(page, 400)
            _chart_whole(page, "#job-chart", 400)
            page.screenshot(path=str(art / "job-400.png"), full_page=True)
            shots += [art / "job-1400.png", art / "job-400.png"]
            page.locator("#job-actions button.cancel").click()
            _wait_for(
                lambda: api.get(f"/v1/fine_tuning/jobs/{long_job}").json()["status"] == "cancelled",
                "the cancel",
            )
            page.locator('#job-events tr.event-row td:text-is("Job cancelled by the user")').wait_for(
                timeout=30_000
            )
            page.wait_for_timeout(2500)  # a refresh after the cancel: the checkpoint list no longer changes
            ckpts = api.get(f"/v1/fine_tuning/jobs/{long_job}/checkpoints?limit=100").json()["data"]
            shown = page.locator("#job-checkpoints tr.checkpoint-row td:first-child").all_inner_texts()
            assert shown == [str(c["step_number"]) for c in ckpts], (shown, ckpts)
            page.goto(f"{srv.url}/")
            page.locator(f'tr.job-row[data-job="{long_job}"][data-status="cancelled"]').wait_for(
                timeout=30_000
            )
            assert (
                page.locator(f'#chart polyline.train[data-job="{long_job}"]').get_attribute("stroke")
                == colour
            )

            # the API reference offline: every request to another host is refused
            foreign: list[str] = []

            def only_local(route):
                if route.request.url.startswith(srv.url):
                    return route.continue_()
                foreign.append(route.request.url)
                return route.abort()

            docs = browser.new_page(viewport={"width": 1400, "height": 900})
            docs.route("**/*", only_local)
            docs.goto(f"{srv.url}/docs")
            docs.locator(".opblock").first.wait_for(timeout=60_000)
            assert docs.locator(".opblock").count() >= 10
            assert docs.get_by_text("/v1/fine_tuning/jobs/{job_id}/events").count() >= 1
            docs.goto(f"{srv.url}/redoc")
            docs.get_by_text("/v1/fine_tuning/jobs/{job_id}/events").first.wait_for(timeout=60_000)
            docs.screenshot(path=str(art / "redoc.png"))
            assert foreign == [], foreign
            assert not js_errors, js_errors
        finally:
            browser.close()
    print("\nscreenshots: " + ", ".join(f"{s} ({s.stat().st_size} bytes)" for s in shots))
