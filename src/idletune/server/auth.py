"""Access: an API key as a Bearer token, cross-origin requests refused, CORS off unless configured.

- With ``server.api_key`` set, every request but the web page's static files (``/`` and
  ``/static/…``) needs ``Authorization: Bearer KEY`` (OpenAI clients send their ``api_key`` so).
  The key is compared in constant time and never logged or echoed.
- Without a key the server only starts on a loopback address, unless ``server.insecure_no_key``
  (``--insecure-no-key``) says otherwise; that opt-out is logged loudly at every start.
- A browser request from another origin (its ``Origin`` header names another host) is refused
  with 403 unless the origin is listed in ``server.cors_origins``: a web page the user happens
  to visit cannot drive a local server (teach it, roll it back, import) behind the user's back.
- DNS rebinding: a page at ``evil.example`` whose name is re-pointed at 127.0.0.1 is
  same-origin with itself, so the Origin check passes; but its requests name
  ``evil.example`` in their ``Host`` header. A server bound to loopback answers only requests
  addressed to a loopback name or address (or a name in ``server.allowed_hosts``); on another
  address, ``server.allowed_hosts`` (when set) limits the names the same way.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from urllib.parse import urlsplit

from ..config import ConfigError, ServerConfig
from .errors import error_body

log = logging.getLogger("idletune.server")

PUBLIC_PATHS = frozenset({"/", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(config: ServerConfig) -> str | None:
    """Refuse to serve without a key on a non-loopback address (ConfigError naming the fix).

    Returns a warning to log loudly when the insecure opt-out is used, else None."""
    if config.api_key or is_loopback(config.host):
        return None
    if not config.insecure_no_key:
        raise ConfigError(
            f"server.host: {config.host} is reachable from other machines, and no API key is set; "
            "set one with --api-key or $IDLETUNE_API_KEY (clients then send 'Authorization: Bearer KEY'), "
            "or pass --insecure-no-key to serve without one")
    return (f"SERVING WITHOUT AN API KEY ON {config.host}:{config.port} (--insecure-no-key): anyone who can reach "
            "this port can chat with the model, teach it, import into it and roll it back")


def _json(status: int, body: dict, extra_headers: list[tuple[bytes, bytes]] = ()) -> tuple[dict, dict]:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
               *extra_headers]
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": data})


class AccessControl:
    """ASGI middleware: the same-origin check, then the Bearer key (when one is configured)."""

    def __init__(self, app, api_key: str | None = None, cors_origins: list[str] | None = None,
                 allowed_hosts: list[str] | None = None, loopback_only: bool = False):
        self.app = app
        self._key = api_key.encode() if api_key else None
        self._origins = {o.rstrip("/").lower() for o in (cors_origins or [])}
        self._hosts = {_host_name(h) for h in (allowed_hosts or [])}
        self._loopback_only = loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        problem = self._host_problem(headers.get("host"))
        if problem is None and (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)):
            return await self.app(scope, receive, send)
        problem = problem or self._problem(headers)
        if problem is None:
            return await self.app(scope, receive, send)
        status, message, code = problem
        extra = [(b"www-authenticate", b'Bearer realm="idletune"')] if status == 401 else []
        start, body = _json(status, error_body(message, code=code), extra)
        if scope["type"] == "websocket":  # no endpoint uses one today; refuse before accepting
            await send({"type": "websocket.close", "code": 1008})
            return
        await send(start)
        await send(body)

    def _host_problem(self, host: str | None) -> tuple[int, str, str] | None:
        if host is None or not (self._loopback_only or self._hosts):
            return None  # no Host header (HTTP/1.0, never a browser), or no limit configured
        name = _host_name(host)
        if name in self._hosts or (self._loopback_only and is_loopback(name)):
            return None
        return (421, f"this server is not reachable by the name {host[:200]!r} (Host header); if that name is "
                     "yours (a reverse proxy, a local DNS name), add it to server.allowed_hosts", "host_not_allowed")

    def _problem(self, headers: dict[str, str]) -> tuple[int, str, str] | None:
        origin = headers.get("origin")
        if origin is not None and not self._same_origin(origin, headers.get("host", "")):
            if "*" not in self._origins and origin.rstrip("/").lower() not in self._origins:
                return (403, f"cross-origin request from {origin[:200]} refused; allow that origin with "
                             "server.cors_origins", "cross_origin_refused")
        if self._key is None:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return (401, "an API key is required: send it as 'Authorization: Bearer KEY'", "missing_api_key")
        if not hmac.compare_digest(token.strip().encode("latin-1"), self._key):
            return (401, "the API key is not valid", "invalid_api_key")
        return None

    @staticmethod
    def _same_origin(origin: str, host: str) -> bool:
        try:
            netloc = urlsplit(origin).netloc.lower()
        except ValueError:
            return False
        return bool(netloc) and netloc == host.lower()


def _host_name(host: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8000`` → ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name[:-1] if name.endswith(".") else name  # "localhost." is "localhost"


def install(app, config: ServerConfig) -> None:
    """Add access control (and CORS when origins are configured) around ``app``.

    Call after every other middleware is added: the last one added runs first."""
    app.add_middleware(AccessControl, api_key=config.api_key, cors_origins=config.cors_origins,
                       allowed_hosts=config.allowed_hosts, loopback_only=is_loopback(config.host))
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["X-Idletune-Weights-Version"])
    if config.api_key:
        _document_bearer(app)


def _document_bearer(app) -> None:
    """Say in /openapi.json that every operation needs the Bearer key (Swagger's Authorize button)."""
    plain = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = plain()
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer", "description": "the server's API key"}
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
