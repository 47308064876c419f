"""``/healthz`` and the dashboard's static files (no token needed): the page, its script and chart, its
styles, all from ``lorafleet/service/static`` (no external resources)."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from ..schemas import Health
from ..store import WorkerRecord
from .deps import ServiceDep

__all__ = ["HEARTBEAT_STALE_S", "router"]

# a worker heartbeat older than this marks the worker as not alive in /healthz
HEARTBEAT_STALE_S = 15.0

router = APIRouter()


def _asset(name: str) -> bytes:
    return resources.files("lorafleet.service").joinpath("static", name).read_bytes()


@router.get("/healthz", response_model=Health, tags=["service"])
def healthz(svc: ServiceDep) -> Health:
    """Liveness of the API and every worker's last heartbeat, newest first (no token needed); ``worker``
    is the newest one."""
    now = svc.store.now()
    workers = [_worker_health(w, now) for w in svc.store.list_workers()]
    first = workers[0] if workers else {"state": "not started", "alive": False}
    return Health(model=svc.served_model, worker=first, workers=workers)


def _worker_health(w: WorkerRecord, now: float) -> dict[str, Any]:
    age = now - w.heartbeat_at
    return {
        "id": w.id, "host": w.host, "pid": w.pid, "base_model": w.base_model, "state": w.state,
        "active_jobs": w.active_jobs, "message": w.message, "time": w.heartbeat_at,
        "heartbeat_age_s": round(age, 3), "alive": age < HEARTBEAT_STALE_S and w.state not in ("stopped", "error"),
        "max_concurrent_tasks": w.max_concurrent_tasks, "max_tokens_per_micro_batch": w.max_tokens_per_micro_batch,
    }  # fmt: skip


@router.get("/", include_in_schema=False)
def dashboard() -> HTMLResponse:
    return HTMLResponse(_asset("dashboard.html"))


# the dashboard's files besides the page, served at /NAME
_ASSETS = {"dashboard.js": "text/javascript", "chart.js": "text/javascript", "dashboard.css": "text/css"}


def _asset_route(name: str, media_type: str) -> None:
    def serve() -> Response:
        return Response(_asset(name), media_type=media_type)

    router.add_api_route("/" + name, serve, methods=["GET"], include_in_schema=False, name=name)


for _name, _type in _ASSETS.items():
    _asset_route(_name, _type)
