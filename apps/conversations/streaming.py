"""Server-sent events for a chat turn: the REST format (one SSE event per turn event) and the
response object that serves it. The OpenAI chunk format is in openai_compat.py; both read the same
turn stream (turn_stream.turn_follow), so a reconnect is served by any instance from an offset.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from django.http import StreamingHttpResponse
from rest_framework.renderers import BaseRenderer

from .turn_stream import Event, turn_follow


def sse(data: Any, *, event: str | None = None, id: int | None = None) -> bytes:
    lines = []
    if id is not None:
        lines.append(f"id: {id}")
    if event:
        lines.append(f"event: {event}")
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    lines.extend(f"data: {line}" for line in text.split("\n"))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


async def follow(turn_id: str, after: int = 0) -> AsyncIterator[Event]:
    """The turn's events; a turn whose instance died is taken over by this one."""
    from .services import turn_takeover

    async for item in turn_follow(turn_id, after=after, on_orphan=turn_takeover):
        yield item


async def rest_events(turn_id: str, after: int = 0) -> AsyncIterator[bytes]:
    """`event: <type>` with `id: <offset>` (what EventSource sends back as Last-Event-ID) and the
    event as data: turn, token, reset, then answer (the same payload as the JSON response) or error."""
    async for offset, event in follow(turn_id, after):
        body = {k: v for k, v in event.items() if k != "type"}
        yield sse(body, event=event.get("type"), id=offset)


def event_stream_response(content: AsyncIterator[bytes], **headers: str) -> StreamingHttpResponse:
    response = StreamingHttpResponse(content, content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def last_event_id(request, default: int = 0) -> int:
    """The offset a resuming client has: Last-Event-ID header, else ?after=. Bad values mean 0."""
    raw = request.headers.get("Last-Event-ID") or request.GET.get("after") or ""
    try:
        value = int(raw)
    except ValueError:
        return default
    return value if value >= 0 else default


class EventStreamRenderer(BaseRenderer):
    """Lets `Accept: text/event-stream` through DRF's content negotiation; what it renders itself is
    only an error raised before the stream started, as one SSE `error` event."""

    media_type = "text/event-stream"
    format = "sse"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None) -> bytes:
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            return sse(data["error"], event="error")
        return sse(data if data is not None else {})
