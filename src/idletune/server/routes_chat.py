"""The OpenAI-compatible endpoints: GET /v1/models, POST /v1/chat/completions."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..inference import GenerationParams, PromptTooLong
from .errors import APIError, error_body
from .limits import check_queue_room
from .schemas import ChatRequest


def make_chat_router(svc) -> APIRouter:
    router = APIRouter()
    server_cfg = svc.config.server

    @router.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": svc.model_name, "object": "model", "created": 0,
                                            "owned_by": "idletune"}]}

    @router.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        if model_id != svc.model_name:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {svc.model_name!r}",
                           param="model", code="model_not_found")
        return {"id": svc.model_name, "object": "model", "created": 0, "owned_by": "idletune"}

    @router.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        messages, params = _prepare(req, server_cfg)

        def admit() -> int:  # one trip to a worker thread: each costs a hand-over of the interpreter lock
            check_queue_room(svc.queue)  # 507 before generating, not after
            return svc.inference.count_prompt_tokens(messages) if req.stream else 0  # 400 before a stream

        n_prompt = await run_in_threadpool(admit)
        gen_id = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def finish(completion) -> None:
            # Every exchange becomes training data (dedup keeps one copy of resent history).
            if completion.finish_reason != "cancelled":
                svc.collector.log_exchange(messages, completion.text, generation_id=gen_id,
                                           version=completion.version)

        if not req.stream:
            try:
                c = await run_in_threadpool(svc.inference.generate, messages, params, marked=True)
            except PromptTooLong as e:
                raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
            await run_in_threadpool(finish, c)
            body = {
                "id": gen_id, "object": "chat.completion", "created": created, "model": svc.model_name,
                "system_fingerprint": f"idletune-v{c.version}",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason, "logprobs": None}],
                "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                          "total_tokens": c.prompt_tokens + c.completion_tokens},
            }
            return JSONResponse(body, headers={"X-Idletune-Weights-Version": str(c.version)})

        # Streaming: generation runs in a worker thread and hands text to the event loop.
        if n_prompt > svc.inference.max_prompt_tokens:
            raise APIError(400, f"the prompt is {n_prompt} tokens; the limit is {svc.inference.max_prompt_tokens}",
                           param="messages", code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def work():
            try:
                c = svc.inference.generate(messages, params,
                                           on_text=lambda t: loop.call_soon_threadsafe(pieces.put_nowait, ("text", t)),
                                           cancelled=cancelled.is_set, marked=True)
                finish(c)
                loop.call_soon_threadsafe(pieces.put_nowait, ("done", c))
            except Exception as e:  # reported in the stream; the server stays up
                loop.call_soon_threadsafe(pieces.put_nowait, ("error", e))

        threading.Thread(target=work, name="idletune-generate", daemon=True).start()

        async def events():
            def chunk(delta: dict, finish_reason=None, version=None) -> str:
                body = {"id": gen_id, "object": "chat.completion.chunk", "created": created,
                        "model": svc.model_name, "system_fingerprint": f"idletune-v{version if version is not None else svc.weights.version}",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
                return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await pieces.get()
                    if kind == "text":
                        yield chunk({"content": value})
                    elif kind == "error":
                        yield f"data: {json.dumps(error_body(str(value), 'server_error'))}\n\n"
                        break
                    else:
                        c = value
                        yield chunk({}, c.finish_reason, c.version)
                        if include_usage:
                            usage = {"id": gen_id, "object": "chat.completion.chunk", "created": created,
                                     "model": svc.model_name, "system_fingerprint": f"idletune-v{c.version}",
                                     "choices": [], "usage": {"prompt_tokens": c.prompt_tokens,
                                                              "completion_tokens": c.completion_tokens,
                                                              "total_tokens": c.prompt_tokens + c.completion_tokens}}
                            yield f"data: {json.dumps(usage)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()  # the client went away: stop generating

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router


def _prepare(req: ChatRequest, cfg) -> tuple[list[dict], GenerationParams]:
    if req.logprobs:
        raise APIError(400, "unsupported parameter 'logprobs': log probabilities are not returned", param="logprobs")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise APIError(400, f"unsupported response_format type {req.response_format.get('type')!r}; only 'text'",
                       param="response_format")
    messages = []
    for i, m in enumerate(req.messages):
        try:
            text = m.text()
        except ValueError as e:
            raise APIError(400, f"messages[{i}].content: {e}", param=f"messages[{i}].content") from None
        if not text.strip():
            raise APIError(400, f"messages[{i}].content is empty", param=f"messages[{i}].content")
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    if messages[-1]["role"] == "assistant":
        raise APIError(400, "the last message must be from the user (or system), not the assistant",
                       param=f"messages[{len(messages) - 1}].role")
    max_tokens = req.max_completion_tokens or req.max_tokens or cfg.default_max_tokens
    if max_tokens > cfg.max_new_tokens:
        raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {cfg.max_new_tokens}",
                       param="max_tokens")
    params = GenerationParams(max_tokens=max_tokens, temperature=req.temperature or 0.0,
                              top_p=req.top_p or 1.0, stop=req.stop or [], seed=req.seed,
                              presence_penalty=req.presence_penalty or 0.0,
                              frequency_penalty=req.frequency_penalty or 0.0)
    return messages, params
