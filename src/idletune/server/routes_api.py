"""idletune's own API: status, feedback, training control, snapshots, live events."""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..config import ConfigError
from .errors import APIError
from .schemas import FeedbackRequest, RollbackRequest, SchedulerUpdate


def status_of(svc) -> dict:
    metrics = svc.engine.get_latest_metrics()
    return {
        "model": svc.model_name,
        "live_version": svc.weights.version,
        "mode": svc.weights.mode,
        "mode_reason": svc.weights.mode_reason,
        "queue": svc.queue.get_stats(),
        "scheduler": svc.scheduler.get_stats(),
        "training": metrics,
        "weights": svc.weights.get_stats(),
        "collector": svc.collector.get_stats(),
        "requests_in_flight": svc.activity.in_flight,
        "problems": list(getattr(svc, "problems", [])),
        "time": time.time(),
    }


def make_api_router(svc) -> APIRouter:
    router = APIRouter(prefix="/api")

    @router.get("/status")
    async def status():
        return await run_in_threadpool(status_of, svc)

    @router.get("/events")
    async def events(request: Request, interval: float = 1.0):
        """Server-sent events: the status every ``interval`` seconds (0.2–10), for live pages."""
        interval = min(10.0, max(0.2, interval))

        stopping = request.app.state.stopping

        async def stream():  # ends when the page goes away, or when the server begins to stop
            while not stopping.is_set() and not await request.is_disconnected():
                data = await run_in_threadpool(status_of, svc)
                yield f"event: status\ndata: {json.dumps(data, default=str)}\n\n"
                waited = 0.0
                while waited < interval and not stopping.is_set():
                    await asyncio.sleep(0.1)
                    waited += 0.1

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @router.get("/metrics")
    async def metrics(limit: int = 500):
        return {"data": await run_in_threadpool(svc.engine.metrics_history, max(1, min(limit, 5000)))}

    @router.get("/queue")
    async def queue(limit: int = 50):
        rows = await run_in_threadpool(svc.queue.recent, max(1, min(limit, 500)))
        return {"data": [r.to_dict() for r in rows], "stats": await run_in_threadpool(svc.queue.get_stats)}

    @router.post("/feedback")
    async def feedback(req: FeedbackRequest):
        if req.correction is None and req.rating is None:
            raise APIError(400, "send 'correction' (with 'messages') or 'rating' (with 'response_id')")
        out: dict = {}
        if req.correction is not None:
            if not req.messages:
                raise APIError(400, "'messages' is required with a correction: the conversation it corrects",
                               param="messages")
            messages = []
            for i, m in enumerate(req.messages):
                try:
                    messages.append({"role": "system" if m.role == "developer" else m.role, "content": m.text()})
                except ValueError as e:  # non-text content parts
                    raise APIError(400, f"messages[{i}].content: {e}", param=f"messages[{i}].content") from None
            if any(not m["content"].strip() for m in messages):
                raise APIError(400, "messages must not be empty", param="messages")
            if not any(m["role"] == "user" for m in messages):
                raise APIError(400, "the corrected conversation needs a user message", param="messages")
            out["example_id"] = await run_in_threadpool(svc.collector.add_correction, messages, req.correction)
            out["priority"] = "high"
        if req.rating is not None:
            if not req.response_id:
                raise APIError(400, "'response_id' is required with a rating (the id of the chat completion)",
                               param="response_id")
            if req.rating == 0:
                raise APIError(400, "rating must be 1 (good) or -1 (bad)", param="rating")
            try:
                out["rating"] = await run_in_threadpool(svc.collector.rate, req.response_id, req.rating)
            except KeyError as e:
                raise APIError(404, str(e.args[0]), param="response_id") from None
        out["queue"] = await run_in_threadpool(svc.queue.get_stats)
        return out

    @router.post("/training/force")
    async def force(wait: bool = False):
        if wait:
            try:
                result = await run_in_threadpool(svc.scheduler.force_training, True)
            except TimeoutError as e:
                raise APIError(504, str(e)) from None
            except RuntimeError as e:  # the scheduler stopped (the service is closing)
                raise APIError(503, str(e)) from None
            return {"result": result, "status": await run_in_threadpool(status_of, svc)}
        return {"result": svc.scheduler.force_training(False), "scheduler": svc.scheduler.get_stats()}

    @router.post("/training/pause")
    async def pause():
        svc.scheduler.pause()
        return {"scheduler": svc.scheduler.get_stats()}

    @router.post("/training/resume")
    async def resume():
        svc.scheduler.resume()
        return {"scheduler": svc.scheduler.get_stats()}

    @router.post("/training/config")
    async def training_config(req: SchedulerUpdate):
        changes = {k: v for k, v in req.model_dump().items() if v is not None}
        try:
            cfg = svc.scheduler.update_config(**changes)
        except ConfigError as e:
            raise APIError(400, str(e)) from None
        return {"scheduler": cfg.__dict__}

    @router.get("/snapshots")
    async def snapshots():
        return {"live_version": svc.weights.version, "data": await run_in_threadpool(svc.weights.list_snapshots)}

    @router.post("/snapshots/rollback")
    async def rollback(req: RollbackRequest | None = None):
        version = None
        if req is not None:
            version = req.version
            if req.id is not None:
                try:
                    version = int(req.id.lstrip("v"))
                except ValueError:
                    raise APIError(400, f"snapshot id {req.id!r} is not of the form v000123", param="id") from None
        try:
            v = await run_in_threadpool(svc.weights.rollback, version, "requested over the API")
        except ValueError as e:
            raise APIError(400, str(e), param="version") from None
        return {"live_version": v, "weights": svc.weights.get_stats()}

    return router
