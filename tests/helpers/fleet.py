"""A fleet on loopback for the tests: ``lorafleet serve --api-only`` and ``lorafleet worker`` subprocesses over
one store URL and one shared data folder, and the fleet's invariants read from the store itself.

``check_store`` reads past the API with the store's own reader: every step of every job has exactly one
metrics event; the events of a job were written with non-decreasing fencing tokens (no worker that had lost
a job wrote for it afterwards); its lease grants never overlap (a new fencing token only once the previous
lease expired or was released). It returns each job's holders in grant order.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from helpers import REPO

__all__ = ["LEASE_S", "Fleet", "Proc", "check_store", "free_port", "holder"]

LEASE_S = 3.0  # short leases keep the takeover tests short


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A lorafleet subprocess whose output goes to a log file."""

    def __init__(self, name: str, log_dir: Path, *args: str) -> None:
        self.name, self.log = name, log_dir / f"{name}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lorafleet", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
            )

    def tail(self) -> str:
        return f"--- {self.name}\n" + (self.log.read_text()[-3000:] if self.log.exists() else "")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Fleet:
    """API processes and workers over the store at ``url`` and the data folder ``root/shared``."""

    def __init__(self, url: str, model: Path, root: Path) -> None:
        self.url, self.model, self.root = url, model, root
        self.data = root / "shared"
        self.apis: list[tuple[Proc, str]] = []
        self.workers: dict[str, Proc] = {}

    def api(self) -> str:
        """Start an API process; its base URL."""
        port = free_port()
        p = Proc(
            f"api-{port}", self.root, "serve", "--api-only", "--store", self.url, "--data-dir", str(self.data),
            "--base-model", str(self.model), "--port", str(port),
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        self.apis.append((p, base))
        return base

    def worker(self, wid: str, *extra: str, lease_s: float = LEASE_S) -> Proc:
        p = Proc(
            wid, self.root, "worker", "--store", self.url, "--data-dir", str(self.data), "--base-model",
            str(self.model), "--worker-id", wid, "--lease-s", str(lease_s), "--poll-interval", "0.1",
            "--num-threads", "1", "--device", "cpu", *extra,
        )  # fmt: skip
        self.workers[wid] = p
        return p

    def wait_ready(self, n_workers: int, timeout: float = 240.0) -> dict:
        """Wait until every API answers and ``n_workers`` workers are ready; the first API's /healthz."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in [*(p for p, _ in self.apis), *self.workers.values()]:
                assert p.proc.poll() is None, self.tails()
            try:
                hs = [httpx.get(f"{base}/healthz", timeout=5).json() for _, base in self.apis]
                ready = [w for w in hs[0]["workers"] if w["alive"] and w["state"] == "ready"]
                if len(ready) >= n_workers:
                    return hs[0]
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"fleet not ready after {timeout} s\n{self.tails()}")

    def wait_until(self, done, timeout: float = 240.0, alive: Proc | None = None) -> None:
        """Poll ``done()`` until it is true; fails after ``timeout`` s (or once ``alive`` has exited)."""
        deadline = time.monotonic() + timeout
        while not done():
            assert alive is None or alive.proc.poll() is None, self.tails()
            assert time.monotonic() < deadline, self.tails()
            time.sleep(0.05)

    def wait_log(self, p: Proc, text: str, timeout: float = 240.0) -> None:
        """Wait until ``text`` appears in ``p``'s log."""
        self.wait_until(lambda: p.log.exists() and text in p.log.read_text(), timeout, alive=p)

    def token(self, tenant: str) -> str:
        """A new API token of ``tenant`` (``lorafleet tokens create``)."""
        return self.cli("tokens", "create", "--tenant", tenant, "--store", self.url)

    def cli(self, *args: str) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "lorafleet", *args], capture_output=True, text=True, cwd=REPO
        )
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r.stdout.strip()

    def tails(self) -> str:
        return "\n".join(p.tail() for p in [*(p for p, _ in self.apis), *self.workers.values()])

    def stop(self) -> None:
        for p in [*self.workers.values(), *(p for p, _ in self.apis)]:
            p.stop()


def check_store(store, job_ids: list[str], steps: int | dict[str, int]) -> dict[str, list[str]]:
    """The fleet's invariants for ``job_ids`` (see the module docstring), each job of ``steps`` steps (one
    number, or one per job id); returns each job's holders in grant order."""
    holders = {}
    for jid in job_ids:
        job = store.get_job_any(jid)
        assert job.status == "succeeded", job
        n = steps if isinstance(steps, int) else steps[jid]
        events, more = store.list_events(jid, None, 1000, ascending=True)
        assert not more
        metrics = [e for e in events if e.type == "metrics"]
        assert sorted(e.step for e in metrics) == list(range(1, n + 1)), jid  # exactly one per step
        by_step = sorted(metrics, key=lambda e: e.step)
        tokens = [e.lease_token for e in by_step]
        assert tokens == sorted(tokens) and tokens[0] >= 1, (jid, tokens)  # fenced: never an old holder
        grants = store.lease_history(jid)
        assert [g.token for g in grants] == list(range(1, len(grants) + 1))
        for a, b in zip(grants, grants[1:], strict=False):
            end = a.expires_at if a.released_at is None else min(a.expires_at, a.released_at)
            assert b.granted_at >= end, (jid, a, b)  # never two holders at once
        holders[jid] = [g.holder for g in grants]
    return holders


def holder(store, job_id: str) -> str | None:
    """The worker that was granted ``job_id``'s newest lease."""
    grants = store.lease_history(job_id)
    return grants[-1].holder if grants else None
