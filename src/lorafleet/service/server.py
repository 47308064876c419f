"""``lorafleet serve``: the API (uvicorn, this process) plus the worker (a child process it supervises).

    lorafleet tokens create --tenant alice --data-dir ./service-data      # prints a token
    lorafleet serve --base-model path/to/model --data-dir ./service-data --port 8000

The API process never imports torch; the worker does (``python -m lorafleet.service.worker_process``). If the
worker exits unexpectedly it is started again (with a growing pause, so a worker that cannot start does not
spin), and it resumes every unfinished job from its checkpoints. With ``--nproc P`` the worker is a group of
P pipeline stages under torchrun: when any rank dies the group ends and the whole group is started again. Stopping the server (Ctrl-C, SIGTERM)
stops the worker; if the server is killed outright, the worker notices and exits too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from ..model_paths import check_base_model_flag
from .app import ServiceSettings, create_app
from .files import DataDir
from .jobspec import EngineSettings
from .store import default_store_url
from .worker_process import serve_worker_id

__all__ = ["WorkerSupervisor", "serve"]

log = logging.getLogger("lorafleet.serve")

_MAX_BACKOFF_S = 30.0
_STOP_GRACE_S = 30.0


class WorkerSupervisor:
    """Starts the worker process and starts it again when it exits unexpectedly."""

    def __init__(self, cmd: list[str]) -> None:
        self.cmd = cmd
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="worker-supervisor")

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        # The worker is started from this thread, which lives until stop(): on Linux the worker's
        # parent-death signal is tied to the thread that started it.
        backoff = 1.0
        while not self._stop.is_set():
            self.proc = subprocess.Popen(self.cmd)
            rc = self.proc.wait()
            if self._stop.is_set():
                break
            log.error("worker exited with code %s; starting it again in %.0f s", rc, backoff)
            self._stop.wait(backoff)
            backoff = min(_MAX_BACKOFF_S, backoff * 2)

    def stop(self) -> None:
        self._stop.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()  # the worker finishes its micro-batch and exits
            try:
                proc.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._thread.join(timeout=5)


def serve(
    base_model: str,
    data_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_mb: float = 100.0,
    dtype: str = "float32",
    device: str = "auto",
    max_concurrent_tasks: int = 8,
    max_tokens_per_micro_batch: int = 4096,
    poll_interval: float = 0.5,
    access_log: bool = False,
    worker: bool = True,
    num_threads: int | None = None,
    store_url: str | None = None,
    adapter_cache_mb: float = 1024.0,
    max_inference_rows: int = 64,
    inference: bool = True,
    nproc: int = 1,
) -> None:
    """Run the API until interrupted, with a supervised worker unless ``worker`` is False (``--api-only``).
    ``store_url``: the job store (default ``sqlite:///DATA_DIR/lorafleet.db``)."""
    import uvicorn

    check_base_model_flag(base_model)
    for flag, value in (
        ("--max-upload-mb", max_upload_mb), ("--max-concurrent-tasks", max_concurrent_tasks),
        ("--max-tokens-per-micro-batch", max_tokens_per_micro_batch), ("--poll-interval", poll_interval),
        ("--num-threads", 1 if num_threads is None else num_threads), ("--adapter-cache-mb", adapter_cache_mb),
        ("--max-inference-rows", max_inference_rows), ("--nproc", nproc),
    ):  # fmt: skip
        if value <= 0:
            raise ValueError(f"{flag} must be > 0 (got {value})")
    base_model = base_model if base_model.startswith("pkg:") else str(Path(base_model).expanduser().resolve())
    dd = DataDir(Path(data_dir).expanduser().resolve()).create()
    store_url = store_url or default_store_url(dd.root)
    engine = EngineSettings(
        base_model=base_model, dtype=dtype, device=device, max_concurrent_tasks=max_concurrent_tasks,
        max_tokens_per_micro_batch=max_tokens_per_micro_batch,
    )  # fmt: skip
    settings = ServiceSettings(
        data_dir=dd.root,
        base_model=base_model,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        engine=engine,
        store_url=store_url,
    )
    app = create_app(settings)
    supervisor = None
    if worker:
        cmd = [
            sys.executable, "-m", "lorafleet.service.worker_process", "--data-dir", str(dd.root), "--base-model", base_model,
            "--dtype", dtype, "--device", device, "--max-concurrent-tasks", str(max_concurrent_tasks),
            "--max-tokens-per-micro-batch", str(max_tokens_per_micro_batch), "--poll-interval", str(poll_interval),
            "--parent-pid", str(os.getpid()), "--store", store_url, "--worker-id", serve_worker_id(dd.root),
        ]  # fmt: skip
        if num_threads is not None:
            cmd += ["--num-threads", str(num_threads)]
        cmd += ["--adapter-cache-mb", str(adapter_cache_mb), "--max-inference-rows", str(max_inference_rows)]
        if not inference:
            cmd.append("--no-inference")
        if nproc > 1:  # the worker as nproc pipeline stages; a dead rank ends the group, started again below
            cmd += ["--nproc", str(nproc)]
        supervisor = WorkerSupervisor(cmd)
        supervisor.start()
        _stop_on_shutdown(app, supervisor)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log)
    finally:
        if supervisor is not None:
            supervisor.stop()


def _stop_on_shutdown(app, supervisor: WorkerSupervisor) -> None:
    """Stop the worker in the app's lifespan shutdown: after a SIGTERM or Ctrl-C, uvicorn finishes its
    graceful shutdown by raising the signal again, so code after ``uvicorn.run`` never runs then."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a):
        async with inner(a) as state:
            try:
                yield state
            finally:
                await asyncio.to_thread(supervisor.stop)

    app.router.lifespan_context = lifespan
