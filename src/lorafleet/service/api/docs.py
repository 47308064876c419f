"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) from local files: they work without internet.

FastAPI's own pages load Swagger UI and ReDoc from a CDN (a blank page offline) and ReDoc's fonts from
Google. These pages are FastAPI's, pointed at the copies of the same bundles that the ``fastapi-offline``
package ships (``fastapi_offline/static``), served here under ``/docs-assets/``, and a Content-Security-Policy
keeps both pages from loading anything from another host. API errors point users to ``/docs`` (``errors.py``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from ..errors import ApiError

__all__ = ["ASSETS", "router"]

# the files served under /docs-assets/, by name, with their media types
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
_PREFIX = "/docs-assets/"
# Both pages may load only from this server: ReDoc's side menu asks another host for a logo (which it hides
# when it does not load), and this keeps the browser from even asking. Inline script and styles: FastAPI's
# pages start the bundles with an inline script; ReDoc runs its search in a blob: worker.
_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'"
)

router = APIRouter(include_in_schema=False)


def _asset_dir() -> Path:
    # an installed wheel is a plain folder, so the traversable is a real path
    return Path(str(resources.files("fastapi_offline").joinpath("static")))


def _title(request: Request) -> str:
    return request.app.title


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    page = get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title=f"{_title(request)}: API reference",
        swagger_js_url=_PREFIX + "swagger-ui-bundle.js",
        swagger_css_url=_PREFIX + "swagger-ui.css",
        swagger_favicon_url=_PREFIX + "favicon.png",
        # no badge from validator.swagger.io (a request to another host on every page view)
        swagger_ui_parameters={"validatorUrl": None},
    )
    page.headers["Content-Security-Policy"] = _CSP
    return page


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    page = get_redoc_html(
        openapi_url=request.app.openapi_url,
        title=f"{_title(request)}: API reference",
        redoc_js_url=_PREFIX + "redoc.standalone.js",
        redoc_favicon_url=_PREFIX + "favicon.png",
        with_google_fonts=False,
    )
    page.headers["Content-Security-Policy"] = _CSP
    return page


@router.get(_PREFIX + "{name}")
def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise ApiError(
            404, f"no docs asset {name!r}: the API reference is at /docs and /redoc", code="not_found"
        )
    return FileResponse(
        _asset_dir() / name, media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=86400"}
    )
