"""API-key scopes per endpoint: a DRF permission class that every API view gets by default.

A view names the scope an API key needs with `api_key_scope`: a scope name, a {method: scope} dict, or
"" for "any key" (e.g. /me/). Without it, reads (GET/HEAD/OPTIONS) need `read` and writes need `manage`,
so a new endpoint is closed to narrow keys until it says otherwise. Session (browser) requests carry no
key and are not limited by scopes; the user's own permissions (apps/core/authz.py) apply to both.
"""
from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission

from django.utils.translation import gettext
from .errors import PermissionDenied

_SAFE = ("GET", "HEAD", "OPTIONS")


def required_scope(view: Any, method: str) -> str:
    declared = getattr(view, "api_key_scope", None)
    if isinstance(declared, dict):
        declared = declared.get(method.upper(), declared.get("*"))
    if declared is not None:
        return declared
    return "read" if method.upper() in _SAFE else "manage"


def key_has_scope(api_key: Any, scope: str) -> bool:
    return not scope or scope in (getattr(api_key, "scopes", None) or [])


def require_key_scope(api_key: Any, scope: str) -> None:
    """Raise PermissionDenied (code scope_missing) when `api_key` (None: no key) lacks `scope`."""
    if api_key is not None and not key_has_scope(api_key, scope):
        raise PermissionDenied(gettext("This API key lacks the '%(scope)s' scope needed here.") % {"scope": scope},
                               code="scope_missing",
                               details={"required": scope, "key_scopes": list(api_key.scopes or [])})


class ApiKeyScopePermission(BasePermission):
    def has_permission(self, request, view) -> bool:
        require_key_scope(getattr(request, "api_key", None), required_scope(view, request.method))
        return True
