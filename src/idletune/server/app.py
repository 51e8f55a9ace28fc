"""The app factory: one FastAPI app around one Service."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from . import errors
from .errors import error_body
from .routes_api import make_api_router
from .routes_chat import make_chat_router
from .routes_import import make_import_router

STATIC = Path(__file__).parent / "static"


def create_app(svc) -> FastAPI:
    app = FastAPI(title="idletune", version="0.1.0",
                  description="A local chat model that learns from its conversations while idle.")
    app.state.svc = svc
    errors.install(app)
    max_body = svc.config.server.max_body_bytes

    max_upload = svc.config.server.max_upload_bytes

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        limit = max_upload if request.url.path == "/api/import/file" else max_body
        if length is not None and length.isdigit() and int(length) > limit:
            return JSONResponse(error_body(f"request body is {int(length)} bytes; the limit is {limit}",
                                           code="request_too_large"), status_code=413)
        return await call_next(request)

    app.include_router(make_chat_router(svc))
    app.include_router(make_api_router(svc))
    app.include_router(make_import_router(svc.queue, svc.import_jobs, svc.importers_config))

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC / "index.html"
        if page.exists():
            return FileResponse(page)
        return JSONResponse({"name": "idletune", "api": "/v1/chat/completions", "status": "/api/status"})

    if STATIC.exists():
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
