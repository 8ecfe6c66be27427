"""Websocket authentication: the session cookie (browsers) or `Authorization: Bearer <key>` (other clients)."""
from __future__ import annotations

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async

from .authentication import bearer_token
from .services import api_key_authenticate


@database_sync_to_async
def _user_for_key(raw_key: str):
    key = api_key_authenticate(raw_key=raw_key)
    return (key.user, key) if key else (None, None)


class ApiKeyWebsocketMiddleware:
    """Runs after the session middleware; a bearer key, when present, decides the user."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        token = bearer_token(headers.get("authorization"))
        if token:
            from django.contrib.auth.models import AnonymousUser

            user, key = await _user_for_key(token)
            scope = dict(scope, user=user or AnonymousUser(), api_key=key)
        return await self.inner(scope, receive, send)


def ApiKeyOrSessionAuthMiddlewareStack(inner):  # noqa: N802 (mirrors channels' naming)
    return AuthMiddlewareStack(ApiKeyWebsocketMiddleware(inner))
