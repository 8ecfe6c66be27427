"""Websocket authentication: the session cookie (browsers) or `Authorization: Bearer <key>` (other clients),
the Origin check (for cookie sessions), and the per-turn identity re-check.

Why the Origin check is for cookies only: it stops cross-site websocket hijacking, where a hostile page
opens a socket that the browser authenticates with the victim's cookie. A browser cannot put an
Authorization header on a websocket, so a bearer-key client is not a browser riding a cookie; non-browser
clients usually send no Origin at all. A client that does send an Origin is still held to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.security.websocket import AllowedHostsOriginValidator

from .authentication import bearer_token
from .services import api_key_authenticate

CLOSE_IDENTITY_GONE = 4401


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


@database_sync_to_async
def _user_for_key(raw_key: str):
    key = api_key_authenticate(raw_key=raw_key)
    return (key.user, key) if key else (None, None)


class ApiKeyWebsocketMiddleware:
    """Runs after the session middleware; a bearer key, when present, decides the user."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        token = bearer_token(_headers(scope).get("authorization"))
        if token:
            from django.contrib.auth.models import AnonymousUser

            user, key = await _user_for_key(token)
            scope = dict(scope, user=user or AnonymousUser(), api_key=key)
        return await self.inner(scope, receive, send)


def ApiKeyOrSessionAuthMiddlewareStack(inner):  # noqa: N802 (mirrors channels' naming)
    return AuthMiddlewareStack(ApiKeyWebsocketMiddleware(inner))


class CookieOriginValidator:
    """AllowedHostsOriginValidator, except for connections with a bearer key and no Origin header."""

    def __init__(self, inner):
        self.inner = inner
        self.validated = AllowedHostsOriginValidator(inner)

    async def __call__(self, scope, receive, send):
        headers = _headers(scope)
        if scope.get("type") == "websocket" and "origin" not in headers and bearer_token(headers.get("authorization")):
            return await self.inner(scope, receive, send)
        return await self.validated(scope, receive, send)


@dataclass
class IdentityCheck:
    user: Any = None  # the fresh user to run this turn as (None when refused)
    code: str = ""
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.user is not None


def _recheck(scope) -> IdentityCheck:
    from .identity import user_fresh
    from .scopes import key_has_scope

    token = bearer_token(_headers(scope).get("authorization")) if scope.get("api_key") is not None else None
    if token:
        key = api_key_authenticate(raw_key=token)  # cached; api_key_revoked/user_changed drop the entry
        if key is None:
            return IdentityCheck(code="api_key_revoked", message="The API key of this connection was revoked, "
                                                                  "has expired or its user was deactivated.")
        if not key_has_scope(key, "chat"):
            return IdentityCheck(code="scope_missing", message="This API key lacks the 'chat' scope.")
        user_id = key.user_id
    else:
        user = scope.get("user")
        user_id = getattr(user, "pk", None) if getattr(user, "is_authenticated", False) else None
        if user_id is None:
            return IdentityCheck(code="not_authenticated", message="Sign in again.")
        session = scope.get("session")
        if session is not None and getattr(session, "session_key", None):
            from django.contrib.auth import SESSION_KEY

            # A logout elsewhere ends the session this socket was opened with (the store is the cache).
            if str(session.__class__(session_key=session.session_key).get(SESSION_KEY)) != str(user_id):
                return IdentityCheck(code="session_ended", message="Your session has ended; sign in again.")
    fresh = user_fresh(user_id)  # cached; user_changed (deactivation, groups, permissions) drops the entry
    if fresh is None or not fresh.is_active:
        return IdentityCheck(code="user_inactive", message="This account is deactivated.")
    return IdentityCheck(user=fresh)


async def ws_identity_recheck(scope) -> IdentityCheck:
    """Before every turn: is the connection's identity still good, and who is it now?

    Returns the user as the database has it now (groups and permissions included) or a refusal with a
    stable code; the consumer sends an error frame and closes with CLOSE_IDENTITY_GONE on a refusal.
    Cheap: the key lookup and the user row are cached per process and dropped by api_key_revoked and
    user_changed on every instance."""
    return await database_sync_to_async(_recheck, thread_sensitive=False)(scope)
