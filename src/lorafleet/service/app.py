"""The REST API application: ``create_app`` mounts the routers of ``lorafleet.service.api``.

    lorafleet serve --base-model path/to/model --data-dir ./service-data     # API + worker
    curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8000/v1/fine_tuning/jobs

This process never imports torch (``tests/test_service.py::test_api_process_never_imports_torch``): it validates requests, writes
them to the store, and reads back what the worker (``worker.py``, a separate process) records. Every
error is ``{"error": {"message", "type", "param", "code"}}`` (``errors.py``) with a 4xx status whose
message says what was wrong and how to fix it; a tenant asking for another tenant's object gets the same
404 as for an object that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from .api import adapters, dashboard, docs, files, inference, jobs, models
from .api.deps import Service, model_name
from .api.limits import BodyLimit
from .errors import ApiError, install_error_handlers
from .files import DataDir
from .jobspec import EngineSettings
from .store import Store, default_store_url, open_store

__all__ = ["ApiError", "ServiceSettings", "create_app", "model_name"]


@dataclass
class ServiceSettings:
    """What the API needs to know; ``lorafleet serve`` fills it from its flags."""

    data_dir: Path
    base_model: str
    max_upload_bytes: int = 100 * 1024 * 1024
    engine: EngineSettings | None = None  # the worker's settings, to validate jobs (None: the defaults)
    store_url: str | None = None  # None: sqlite:///DATA_DIR/lorafleet.db

    def __post_init__(self) -> None:
        if self.engine is None:
            self.engine = EngineSettings(base_model=self.base_model)


def create_app(settings: ServiceSettings, store: Store | None = None) -> FastAPI:
    """The FastAPI application over ``settings.data_dir`` and the store at ``settings.store_url`` (unless
    ``store`` is given)."""
    dd = DataDir(Path(settings.data_dir)).create()
    if store is None:
        store = open_store(settings.store_url or default_store_url(dd.root))
    app = FastAPI(
        title="lorafleet fine-tuning service",
        version="0.1.0",
        docs_url=None,  # /docs and /redoc come from api/docs.py, with local assets (no CDN)
        redoc_url=None,
        description=(
            "Fine-tune LoRA adapters on one shared base model. Every /v1 request needs "
            "`Authorization: Bearer TOKEN` (`lorafleet tokens create --tenant NAME`)."
        ),
    )
    app.state.store = store
    app.state.settings = settings
    app.state.service = Service(store, dd, settings, model_name(settings.base_model))
    app.add_middleware(BodyLimit, upload_limit=settings.max_upload_bytes)
    install_error_handlers(app)
    for module in (dashboard, docs, files, jobs, models, inference, adapters):
        app.include_router(module.router)
    return app
