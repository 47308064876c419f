"""The whole service in one process, for tests and benchmarks: the API under uvicorn on a free loopback
port and the worker in a thread (``lorafleet serve`` runs the worker as a supervised child process instead).

    with InProcessService(data_dir, base_model) as svc:
        client = openai.OpenAI(base_url=svc.url, api_key=svc.token("alice"))
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from . import auth
from .app import ServiceSettings, create_app
from .files import DataDir
from .jobspec import EngineSettings
from .worker import Worker

__all__ = ["InProcessService"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InProcessService:
    """API (uvicorn, real port) + worker thread over ``data_dir``; ``url`` is the SDK's ``base_url``."""

    def __init__(self, data_dir: str | Path, base_model: str, poll_interval: float = 0.05, **engine) -> None:
        import uvicorn

        self.base_model = base_model
        self.app = create_app(
            ServiceSettings(Path(data_dir), base_model, engine=EngineSettings(base_model, **engine))
        )
        self.store, self.dd = self.app.state.store, DataDir(Path(data_dir))
        self.worker = Worker(self.store, self.dd, self.app.state.settings.engine, poll_interval=poll_interval)
        self._stop = threading.Event()
        self._worker_thread = threading.Thread(target=self.worker.run, args=(self._stop,), daemon=True)
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, port=self.port, log_level="warning"))
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.base = self.app.state.service.served_model
        self._tokens: dict[str, str] = {}

    def start(self, timeout: float = 120.0) -> InProcessService:
        self._worker_thread.start()
        threading.Thread(target=self.server.run, daemon=True, name="uvicorn").start()
        deadline = time.monotonic() + timeout
        while not (self.server.started and self.worker.inference is not None):
            if time.monotonic() > deadline or not self._worker_thread.is_alive():
                raise RuntimeError(f"the in-process service did not start within {timeout} s")
            time.sleep(0.05)
        return self

    def token(self, tenant: str) -> str:
        """An API token of ``tenant`` (created on first use)."""
        if tenant not in self._tokens:
            self._tokens[tenant] = auth.create_token(self.store, tenant)[1]
        return self._tokens[tenant]

    def close(self) -> None:
        self.server.should_exit = True
        self._stop.set()
        self._worker_thread.join(timeout=60)

    def __enter__(self) -> InProcessService:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
