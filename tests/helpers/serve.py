"""A real ``lorafleet serve`` subprocess (uvicorn + its supervised worker) on a free loopback port, for the
end-to-end service tests and the dashboard's browser test."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from . import REPO
from .fleet import free_port

__all__ = ["Server"]


class Server:
    """A ``lorafleet serve`` subprocess on a free port; its output goes to ``log``."""

    def __init__(self, model: Path, data: Path, *extra: str) -> None:
        self.model, self.data, self.extra = model, data, extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data.parent / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> Server:
        cmd = [
            sys.executable, "-m", "lorafleet", "serve", "--base-model", str(self.model), "--data-dir", str(self.data),
            "--port", str(self.port), "--device", "cpu", "--poll-interval", "0.05", "--num-threads", "1", *self.extra,
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.tail()}"
            try:
                h = httpx.get(f"{self.url}/healthz", timeout=2).json()
                if h["worker"].get("alive") and h["worker"].get("state") == "ready":
                    self.worker_pid = h["worker"]["pid"]
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout} s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
