"""Websocket metrics as ASGI middleware, so no consumer has to remember to count itself.

Wrap the websocket branch of the ASGI application (kotaemon_site/asgi.py):

    "websocket": WebsocketMetricsMiddleware(AllowedHostsOriginValidator(...)),

Counts connection attempts by outcome (accepted, rejected), open connections, client frames, and the
latency from a client frame to the first frame the server sends back (a websocket "request").
Routes are URL patterns ("/ws/chat/<str:session_id>/"), never raw paths.
"""
from __future__ import annotations

import time
from typing import Any, Awaitable, Callable, Iterable

from .metrics import (
    websocket_connection_duration_seconds,
    websocket_connections_active,
    websocket_connections_total,
    websocket_message_duration_seconds,
    websocket_messages_total,
)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def websocket_route(path: str, patterns: Iterable[Any] | None = None) -> str:
    """The URL pattern a websocket path matches, for use as a metric label."""
    if patterns is None:
        from kotaemon_site.routing import websocket_urlpatterns as patterns
    candidate = path.lstrip("/")
    for pattern in patterns:
        resolver_pattern = getattr(pattern, "pattern", None)
        if resolver_pattern is not None and resolver_pattern.match(candidate):
            return "/" + str(resolver_pattern).lstrip("^").rstrip("$")
    return "unmatched"


class WebsocketMetricsMiddleware:
    def __init__(self, inner, patterns: Iterable[Any] | None = None):
        self.inner = inner
        self.patterns = list(patterns) if patterns is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope.get("type") != "websocket":
            return await self.inner(scope, receive, send)
        route = websocket_route(scope.get("path", ""), self.patterns)
        state = {"accepted": False, "closed": False, "opened_at": None, "pending": []}

        def finish() -> None:
            if state["accepted"] and not state["closed"]:
                state["closed"] = True
                websocket_connections_active.labels(route).dec()
                websocket_connection_duration_seconds.labels(route).observe(time.monotonic() - state["opened_at"])

        async def counting_receive() -> dict:
            message = await receive()
            kind = message.get("type")
            if kind == "websocket.receive":
                websocket_messages_total.labels(route).inc()
                state["pending"].append(time.perf_counter())
            elif kind == "websocket.disconnect":
                finish()
            return message

        async def counting_send(message: dict) -> None:
            kind = message.get("type")
            if kind == "websocket.accept" and not state["accepted"]:
                state["accepted"], state["opened_at"] = True, time.monotonic()
                websocket_connections_total.labels(route, "accepted").inc()
                websocket_connections_active.labels(route).inc()
            elif kind == "websocket.close":
                if not state["accepted"]:
                    websocket_connections_total.labels(route, "rejected").inc()
                    state["accepted"] = state["closed"] = True  # counted once, never "active"
                else:
                    finish()
            elif kind == "websocket.send" and state["pending"]:
                # The first reply frame answers the oldest unanswered client frame.
                started = state["pending"].pop(0)
                websocket_message_duration_seconds.labels(route).observe(time.perf_counter() - started)
            await send(message)

        try:
            return await self.inner(scope, counting_receive, counting_send)
        finally:
            finish()
