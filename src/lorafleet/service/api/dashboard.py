"""``/healthz`` and the dashboard's static files (no token needed)."""

from __future__ import annotations

import time
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from ..schemas import Health
from .deps import ServiceDep

__all__ = ["HEARTBEAT_STALE_S", "router"]

# a worker heartbeat older than this marks the worker as not alive in /healthz
HEARTBEAT_STALE_S = 15.0

router = APIRouter()


def _asset(name: str) -> bytes:
    return resources.files("lorafleet.service").joinpath("static", name).read_bytes()


@router.get("/healthz", response_model=Health, tags=["service"])
def healthz(svc: ServiceDep) -> Health:
    """Liveness of the API and the worker's last heartbeat (no token needed)."""
    beat = svc.store.get_meta("worker") or {"state": "not started"}
    age = time.time() - beat.get("time", 0.0)
    return Health(model=svc.served_model, worker={**beat, "alive": age < HEARTBEAT_STALE_S})


@router.get("/", include_in_schema=False)
def dashboard() -> HTMLResponse:
    return HTMLResponse(_asset("dashboard.html"))


@router.get("/dashboard.js", include_in_schema=False)
def dashboard_js() -> Response:
    return Response(_asset("dashboard.js"), media_type="text/javascript")


@router.get("/dashboard.css", include_in_schema=False)
def dashboard_css() -> Response:
    return Response(_asset("dashboard.css"), media_type="text/css")
