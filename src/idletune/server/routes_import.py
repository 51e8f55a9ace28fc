"""HTTP routes of the importers: ``/api/import/url``, ``/file``, ``/text`` and job status.

Imports run as :class:`~idletune.importers.ImportJobs` jobs. Uploads and texts up to
``inline_max_bytes`` are imported before the response: 200 with the finished job, or the
import's error as a 4xx. Larger ones, and every URL (after its address is checked), answer
202 with the job; poll ``GET /api/import/{job_id}``. Errors use OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..importers import ImportersConfig, ImportFailed, ImportJobs, Importers
from ..importers.jobs import FAILED


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None,
           **extra: Any) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse(status_code=status, content={
        "error": {"message": message, "type": kind, "param": param, "code": code}, **extra})


def _failed(e: ImportFailed) -> JSONResponse:
    return JSONResponse(status_code=e.http_status, content={"error": e.to_dict()})


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise ImportFailed(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ImportFailed("the request body must be a JSON object", code="invalid_json")
    return body


def _optional_str(body: dict, key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise ImportFailed(f"{key} must be a string or null", code="invalid_request", param=key)
    return value


def make_import_router(queue, jobs: ImportJobs, importers_config: ImportersConfig | None = None) -> APIRouter:
    """The import routes over ``queue``, running imports on ``jobs``."""
    config = importers_config or ImportersConfig()
    importers = Importers(queue, config)
    router = APIRouter(prefix="/api/import", tags=["import"])

    async def respond(job_id: str, inline: bool) -> JSONResponse:
        if not inline:  # always 202, however far the job got already: the answer must not race it
            return JSONResponse(status_code=202, content=jobs.get(job_id))
        job = await run_in_threadpool(jobs.wait, job_id, config.inline_wait_s)
        if job["status"] == FAILED:
            error = dict(job["error"])
            status = error.pop("http_status", 400)
            return JSONResponse(status_code=status, content={"error": error, "job_id": job_id})
        return JSONResponse(status_code=200 if job["status"] == "done" else 202, content=job)

    @router.post("/url")
    async def import_url(request: Request) -> JSONResponse:
        """``{"url": ..., "depth": 0, "max_pages": null}`` → 202 ``{"job_id": ...}``."""
        try:
            body = await _json_object(request)
            url = body.get("url")
            if not isinstance(url, str) or not url.strip():
                raise ImportFailed("url is required (a string starting with http:// or https://)",
                                   code="invalid_url", param="url")
            depth, max_pages = body.get("depth", 0), body.get("max_pages")
            max_pages = importers.web.check_crawl(depth, max_pages)
            url = await run_in_threadpool(importers.web.check_url, url)  # DNS + SSRF check, before queueing
        except ImportFailed as e:
            return _failed(e)
        job_id = jobs.submit(importers.web.import_website, url, depth=depth, max_pages=max_pages,
                             kind="url", source=url)
        return await respond(job_id, inline=False)

    @router.post("/file")
    async def import_file(request: Request) -> JSONResponse:
        """Multipart upload, field ``file`` (optional field ``format``)."""
        limit = config.max_upload_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit + 64 * 1024:
            return _error(413, f"the upload is {int(length) / 1e6:.1f} MB, over the {limit / 1e6:.0f} MB limit",
                          param="file", code="too_large")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return _error(400, "send the file as multipart/form-data in a field named 'file'", param="file",
                          code="invalid_request")
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:  # malformed multipart bodies
            return _error(400, f"the multipart body could not be read: {getattr(e, 'detail', e)}", param="file",
                          code="invalid_request")
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                return _error(400, "no file in the upload: send it in a multipart field named 'file'",
                              param="file", code="invalid_request")
            data = await upload.read(limit + 1)
            name = upload.filename or "upload"
            fmt = form.get("format")
            fmt = fmt if isinstance(fmt, str) and fmt else None
        finally:
            await form.close()
        if len(data) > limit:
            return _error(413, f"{name} is over the {limit / 1e6:.0f} MB upload limit", param="file", code="too_large")
        job_id = jobs.submit(importers.import_bytes, data, name, format=fmt, kind="file", source=name)
        return await respond(job_id, inline=len(data) <= config.inline_max_bytes)

    @router.post("/text")
    async def import_text(request: Request) -> JSONResponse:
        """``{"text": ..., "format": null, "name": null}``."""
        try:
            body = await _json_object(request)
            text = body.get("text")
            if not isinstance(text, str):
                raise ImportFailed("text is required and must be a string", code="invalid_request", param="text")
            fmt, name = _optional_str(body, "format"), _optional_str(body, "name")
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > config.text.max_bytes:
                raise ImportFailed(f"text is {size / 1e6:.1f} MB, over the {config.text.max_bytes / 1e6:.0f} MB "
                                   "limit", code="too_large", param="text")
            if not text.strip():
                raise ImportFailed("text is empty: there is nothing to import", code="empty", param="text")
        except ImportFailed as e:
            return _failed(e)
        job_id = jobs.submit(importers.text.import_text, text, format=fmt, name=name, kind="text",
                             source=name or "text")
        return await respond(job_id, inline=size <= config.inline_max_bytes)

    @router.get("")
    async def list_jobs(limit: int = 50) -> dict[str, Any]:
        """Recent import jobs, newest first."""
        return {"object": "list", "data": jobs.list(max(1, min(limit, 500)))}

    @router.get("/{job_id}")
    async def get_job(job_id: str) -> JSONResponse:
        try:
            return JSONResponse(content=jobs.get(job_id))
        except KeyError as e:
            return _error(404, e.args[0], param="job_id", code="job_not_found")

    return router
