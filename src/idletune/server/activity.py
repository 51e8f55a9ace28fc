"""A chat completion counts as in flight from the moment its request reaches the server.

The inference engine marks a request in flight (:meth:`ActivityTracker.request`) when generation
starts. Over HTTP that is late: before it, the event loop parses and validates the body, a
worker thread checks the queue's room and counts the prompt's tokens, and a generation thread
starts. Training running meanwhile holds the interpreter lock in turns with each of those steps
(its compiled layers' calls are mostly Python), so every hand-over costs up to a switch interval.
Marked at the first byte, training stops at its next layer boundary while the request is still
being read (docs/BENCHMARKS.md, run DK).
"""
from __future__ import annotations

CHAT_PATHS = frozenset({"/v1/chat/completions"})


class MarkChatInFlight:
    """Pure ASGI middleware: ``POST /v1/chat/completions`` is in flight (training yields, the
    idle clock stops) until its response, streamed or not, has been sent or the client has gone."""

    def __init__(self, app, activity, paths=CHAT_PATHS) -> None:
        self.app, self.activity, self.paths = app, activity, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        with self.activity.request():
            await self.app(scope, receive, send)
