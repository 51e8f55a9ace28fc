"""Request limits: body size (declared or chunked) and a full training queue.

- A body larger than ``server.max_body_bytes`` (``server.max_upload_bytes`` plus 64 KiB of
  multipart framing for ``POST /api/import/file``) gets 413 ``request_too_large``: at once when
  its ``Content-Length`` says so, and as soon as the count passes the limit for a chunked body
  that declares no length (the rest is never read).
- When the queue holds ``queue.max_examples`` examples, anything that would add one gets 507
  ``queue_full`` (Insufficient Storage) and nothing is stored; nothing already stored is ever
  dropped to make room. Chat completions are refused before generating, so an answer is never
  given for an exchange that could not be kept.
"""
from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse

from ..queue import QueueFullError
from .errors import error_body

UPLOAD_PATH = "/api/import/file"
MULTIPART_SLACK = 64 * 1024


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware counting request body bytes against the limit for the path."""

    def __init__(self, app, max_body_bytes: int, max_upload_bytes: int):
        self.app = app
        self.max_body, self.max_upload = max_body_bytes, max_upload_bytes

    def limit_for(self, path: str) -> int:
        return self.max_upload + MULTIPART_SLACK if path == UPLOAD_PATH else self.max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope.get("path", ""))
        declared = next((v for k, v in scope.get("headers", []) if k.lower() == b"content-length"), None)
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            return await _too_large(send, f"the request body is {int(declared)} bytes; the limit is {limit}")

        received = 0
        exceeded = False
        started = False

        async def counting_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if exceeded:  # whatever the app answers after the limit was hit, the client gets 413
                if not started:
                    started = True
                    await _too_large(send, _chunked_message(limit))
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLarge:
            if not started:
                await _too_large(send, _chunked_message(limit))


def _chunked_message(limit: int) -> str:
    return f"the request body is over the limit of {limit} bytes"


async def _too_large(send, message: str) -> None:
    data = json.dumps(error_body(message, code="request_too_large")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


def queue_full_message(queue) -> str:
    return (f"the training queue is full ({queue.max_examples} examples, queue.max_examples); nothing new is "
            "accepted until that limit is raised or trained examples are removed")


def check_queue_room(queue) -> None:
    """Raise QueueFullError (answered with 507) if the queue cannot take another example."""
    if queue.size() >= queue.max_examples:
        raise QueueFullError(queue_full_message(queue))


def install(app, config) -> None:
    """Add the body limit and the queue-full answer to ``app``."""
    app.add_middleware(BodyLimit, max_body_bytes=config.max_body_bytes, max_upload_bytes=config.max_upload_bytes)

    @app.exception_handler(QueueFullError)
    async def _queue_full(request: Request, exc: QueueFullError):
        return JSONResponse(error_body(str(exc), "insufficient_storage", code="queue_full"), status_code=507)
