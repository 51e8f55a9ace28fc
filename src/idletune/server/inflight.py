"""A chat completion counts as in flight from the moment its request has reached the server.

The inference engine marks a request in flight (:meth:`ActivityTracker.request`) when generation
starts. Over HTTP that is late: before it, the event loop validates the body, a worker thread
checks the queue's room and counts the prompt's tokens, and a generation thread starts. Training
running meanwhile holds the interpreter lock in turns with each of those steps (its compiled
layers' calls are mostly Python), so every hand-over costs up to a switch interval. Marked once
its body is in, training stops at its next layer boundary while the request is still being
checked: the added time to first token under a training backlog fell from +3.45 to +1.32 ms at
the median over HTTP (docs/BENCHMARKS.md, runs DK–DM). Not before the body is in: a client that
sends headers and stalls would otherwise keep training stopped for as long as it stays connected.
"""
from __future__ import annotations

from contextlib import ExitStack

CHAT_PATHS = frozenset({"/v1/chat/completions"})


class MarkChatInFlight:
    """Pure ASGI middleware: ``POST /v1/chat/completions`` is in flight (training yields, the
    idle clock stops) from when its whole body has been received until its response has been
    sent, streamed or not. A streamed response ends early when the client goes away; a
    non-streamed one once its generation ends."""

    def __init__(self, app, activity, paths=CHAT_PATHS) -> None:
        self.app, self.activity, self.paths = app, activity, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        with ExitStack() as mark:
            body_in = False

            async def receive_and_mark():
                nonlocal body_in
                message = await receive()
                if message["type"] == "http.request" and not message.get("more_body", False) and not body_in:
                    body_in = True
                    mark.enter_context(self.activity.request())
                return message

            await self.app(scope, receive_and_mark, send)
