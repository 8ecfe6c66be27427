"""DRF authentication by API key: `Authorization: Bearer <key>`."""
from __future__ import annotations

from django.utils.translation import gettext
from rest_framework import authentication, exceptions

from .services import KEY_PREFIX, api_key_authenticate


def bearer_token(header_value: str | None) -> str | None:
    if not header_value:
        return None
    parts = header_value.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1]


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            return None
        if not token.startswith(KEY_PREFIX):
            raise exceptions.AuthenticationFailed(gettext("Malformed API key."))
        key = api_key_authenticate(raw_key=token)
        if key is None:
            raise exceptions.AuthenticationFailed(gettext("Invalid, expired or revoked API key."))
        request.api_key = key
        return key.user, key

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'
