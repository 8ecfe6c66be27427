"""Websocket chat: /ws/chat/<session_id>/ (session cookie or API key).

Client -> server: {"type": "message", "message": "...", "knowledge_bases": [...]}, {"type": "ping"}, or
{"type": "resume", "turn_id"?: "...", "offset": n} after a reconnect (any instance).
Server -> client, each answer event with its "offset" in the turn's event log: {"type": "turn", "turn_id",
"session_id", "user_message_id", "message_id"}, {"type": "token", "text": "..."} while the answer is
generated, {"type": "reset"} (drop the text so far: a takeover regenerated it differently), then one
{"type": "answer", ...same payload as POST /api/v1/chat/}; or {"type": "error", "code", "message",
"details"}. Recoverable errors (bad frames, throttling, a failed generation) keep the connection;
a bad or foreign session id closes it after the error frame.
"""
from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace
from typing import Any

from channels.db import DatabaseSyncToAsync
from channels.generic.websocket import AsyncWebsocketConsumer
from django.utils import translation
from django.utils.translation import gettext

from apps.core.errors import SERVER_ERROR, ApplicationError
from apps.core.i18n import language_from_scope
from apps.core.throttling import ChatRateThrottle
from apps.core.ws_auth import CLOSE_IDENTITY_GONE, ws_identity_recheck

logger = logging.getLogger(__name__)

MAX_FRAME_BYTES = 64 * 1024
CLOSE_UNAUTHENTICATED = 4401
CLOSE_BAD_SESSION = 4400
CLOSE_NOT_FOUND = 4404


def in_thread(func):
    """Run blocking Django code in the shared thread pool, not the single thread-sensitive executor:
    concurrent turns on one instance must not queue behind each other. Stale DB connections are
    closed around each call, as channels' database_sync_to_async does."""
    return DatabaseSyncToAsync(func, thread_sensitive=False)


def _check_session(user, session_id: str) -> None:
    from .selectors import conversation_find

    conversation_find(user=user, session_id=session_id)


def _throttle_wait(user, api_key, client_ip: str) -> float | None:
    """Seconds to wait when the chat rate limit (the same one as REST) is exhausted, else None."""
    throttle = ChatRateThrottle()
    request = SimpleNamespace(user=user, api_key=api_key, META={"REMOTE_ADDR": client_ip}, _request=None)
    if throttle.allow_request(request, None):
        return None
    return throttle.wait() or 1.0


def _start_turn(user, session_id: str, message: Any, knowledge_bases: Any):
    from .services import turn_start

    return turn_start(user=user, session_id=session_id, message=message, knowledge_bases=knowledge_bases,
                      channel="websocket")


def _resume_target(user, session_id: str, turn_id: Any) -> str:
    from .services import turn_for_resume

    return turn_for_resume(user=user, turn_id=turn_id, session_id=session_id)


class ChatConsumer(AsyncWebsocketConsumer):
    # No channel layer per connection: nothing is ever sent to one socket through the layer (cluster
    # events go through apps.core.cluster), and with channels-redis every idle socket would otherwise
    # hold a blocking Redis receive that must be cancelled on disconnect (connection churn, stuck teardown).
    channel_layer_alias = None

    async def dispatch(self, message):
        # No LocaleMiddleware here: every frame is handled (and every turn run, its task inheriting the
        # context) in the language of the handshake's cookie or Accept-Language, as the page is served.
        if not hasattr(self, "language"):
            self.language = language_from_scope(self.scope)
        with translation.override(self.language):
            await super().dispatch(message)

    async def connect(self):
        from apps.monitoring.metrics import websocket_connections_total

        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            websocket_connections_total.labels("chat", "refused").inc()
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        self.session_id = self.scope["url_route"]["kwargs"]["session_id"]
        self.turn: asyncio.Task | None = None
        await self.accept()
        try:
            await in_thread(_check_session)(user, self.session_id)
        except ApplicationError as exc:
            websocket_connections_total.labels("chat", "bad_session").inc()
            await self.send_error(exc.code, exc.message)
            await self.close(code=CLOSE_NOT_FOUND if exc.status_code == 404 else CLOSE_BAD_SESSION)
            return
        websocket_connections_total.labels("chat", "accepted").inc()

    async def disconnect(self, code):
        # The answer goes on in its own thread and is saved; only this socket's reading stops.
        self.closed = True
        if getattr(self, "turn", None) is not None and not self.turn.done():
            self.turn.cancel()

    async def receive(self, text_data=None, bytes_data=None):
        if text_data is None:
            await self.send_error("bad_frame", gettext("Send JSON text frames, not binary."))
            return
        if len(text_data.encode("utf-8")) > MAX_FRAME_BYTES:
            await self.send_error("frame_too_large", gettext("A frame is at most %(kib)d KiB.")
                                  % {"kib": MAX_FRAME_BYTES // 1024})
            return
        try:
            payload = json.loads(text_data)
        except ValueError:
            await self.send_error("malformed_json", gettext("The frame is not valid JSON."))
            return
        if not isinstance(payload, dict):
            await self.send_error("invalid_frame", gettext('A frame is a JSON object with a "type".'))
            return
        kind = payload.get("type")
        if kind == "ping":
            await self.send_json({"type": "pong"})
            return
        if kind not in ("message", "resume"):
            await self.send_error("unknown_type",
                                  gettext('Unknown frame type; send {"type": "message", "message": "..."}.'),
                                  details={"type": str(kind)[:40]})
            return
        if self.turn is not None and not self.turn.done():
            await self.send_error("turn_in_progress", gettext("Wait for the answer before sending the next message."))
            return
        # Every turn: the key or session still valid, the user still active, groups as they are now.
        identity = await ws_identity_recheck(self.scope)
        if not identity.ok:
            await self.send_error(identity.code, identity.message)
            await self.close(code=CLOSE_IDENTITY_GONE)
            return
        self.user = identity.user
        if kind == "resume":
            offset = payload.get("offset", 0)
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                await self.send_error("invalid_frame", gettext("offset is the last offset received (0 for all)."))
                return
            try:
                turn_id = await in_thread(_resume_target)(self.user, self.session_id, payload.get("turn_id"))
            except ApplicationError as exc:
                await self.send_error(exc.code, exc.message, details=exc.details)
                return
            self.turn = asyncio.ensure_future(self._follow(turn_id, offset))
            return
        client = self.scope.get("client") or ("", 0)
        wait = await in_thread(_throttle_wait)(self.user, self.scope.get("api_key"), client[0] or "")
        if wait is not None:
            retry = int(wait + 0.999)
            await self.send_error("throttled", gettext("Too many messages; retry in %(seconds)d s.") % {"seconds": retry},
                                  details={"retry_after_seconds": retry})
            return
        self.turn = asyncio.ensure_future(self._turn(payload.get("message"), payload.get("knowledge_bases")))

    async def _turn(self, message: Any, knowledge_bases: Any) -> None:
        try:
            handle = await in_thread(_start_turn)(self.user, self.session_id, message, knowledge_bases)
        except ApplicationError as exc:
            await self.send_error(exc.code, exc.message, details=exc.details)
            return
        except Exception:
            logger.exception("chat turn failed on the websocket")
            await self.send_error("server_error", str(SERVER_ERROR))
            return
        await self._follow(handle.turn_id, 0)

    async def _follow(self, turn_id: str, after: int) -> None:
        from .services import turn_takeover
        from .turn_stream import turn_follow

        try:
            async for offset, event in turn_follow(turn_id, after=after, on_orphan=turn_takeover):
                await self.send_json({**event, "offset": offset})
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("following a chat turn failed on the websocket")
            await self.send_error("server_error", str(SERVER_ERROR))

    async def send_error(self, code: str, message: str, *, details: dict | None = None) -> None:
        await self.send_json({"type": "error", "code": code, "message": str(message), "details": details or {}})

    async def send_json(self, content: dict) -> None:
        if getattr(self, "closed", False):
            return
        await self.send(text_data=json.dumps(content))
