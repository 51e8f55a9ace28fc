"""The app factory: one FastAPI app around one Service."""
from __future__ import annotations

import threading
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse

from . import auth, errors, limits
from .inflight import MarkChatInFlight
from .routes_api import make_api_router
from .routes_chat import make_chat_router
from .routes_import import make_import_router

STATIC = Path(__file__).parent / "static"


def create_app(svc) -> FastAPI:
    app = FastAPI(title="idletune", version="0.1.0",
                  description="A local chat model that learns from its conversations while idle.")
    app.state.svc = svc
    # set when the server begins to stop (``cli._serve``): open status streams end then, rather
    # than being cut off at the end of the shutdown's grace period
    app.state.stopping = threading.Event()
    errors.install(app)
    limits.install(app, svc.config.server)  # body size (declared or chunked), queue full → 507
    app.add_middleware(MarkChatInFlight, activity=svc.activity)  # training yields once a chat's body is in
    auth.install(app, svc.config.server)  # added last, so it runs first: Origin check, Bearer key, CORS

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
