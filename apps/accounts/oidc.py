"""OpenID Connect sign-in (authorization code + PKCE) on mozilla-django-oidc, configured by issuer.

mozilla-django-oidc wants every endpoint configured by hand; we read them from the issuer's discovery
document (``/.well-known/openid-configuration``, cached per process) so an operator sets only the
issuer, the client id and the secret. On top of the library we:

- look users up by (issuer, ``sub``) through :class:`ExternalIdentity`, never by e-mail (the library's
  default links any local account, superusers included, whose e-mail the provider asserts);
- check the ID token's issuer and audience (the library checks signature, expiry and nonce only);
- map the groups claim to Django groups with :mod:`apps.accounts.directory` at every sign-in;
- log out at the provider too (RP-initiated logout with ``id_token_hint``).
"""
from __future__ import annotations

import logging
import threading
import time
from urllib.parse import urlencode

import requests
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model
from django.core.exceptions import SuspiciousOperation
from django.http import HttpResponseRedirect
from django.utils.translation import gettext as _
from mozilla_django_oidc.auth import OIDCAuthenticationBackend
from mozilla_django_oidc.utils import import_from_settings
from mozilla_django_oidc.views import (
    OIDCAuthenticationCallbackView,
    OIDCAuthenticationRequestView,
)

from . import directory

logger = logging.getLogger(__name__)

_DISCOVERED = {
    "OIDC_OP_AUTHORIZATION_ENDPOINT": "authorization_endpoint",
    "OIDC_OP_TOKEN_ENDPOINT": "token_endpoint",
    "OIDC_OP_USER_ENDPOINT": "userinfo_endpoint",
    "OIDC_OP_JWKS_ENDPOINT": "jwks_uri",
}
_DISCOVERY_TTL_SECONDS = 3600
_discovery_lock = threading.Lock()
_discovery_cache: dict[str, tuple[float, dict]] = {}


class DiscoveryError(Exception):
    """The identity provider's discovery document could not be had or is not valid."""


def enabled() -> bool:
    return bool(settings.OIDC_ISSUER)


def provider_id() -> str:
    return f"oidc:{settings.OIDC_ISSUER.rstrip('/')}"


def discovery() -> dict:
    """The issuer's discovery document, fetched at most once an hour per process."""
    issuer = settings.OIDC_ISSUER.rstrip("/")
    now = time.monotonic()
    cached = _discovery_cache.get(issuer)
    if cached and now - cached[0] < _DISCOVERY_TTL_SECONDS:
        return cached[1]
    with _discovery_lock:
        cached = _discovery_cache.get(issuer)
        if cached and now - cached[0] < _DISCOVERY_TTL_SECONDS:
            return cached[1]
        try:
            response = requests.get(f"{issuer}/.well-known/openid-configuration",
                                    timeout=settings.OIDC_TIMEOUT, verify=settings.OIDC_VERIFY_SSL)
            response.raise_for_status()
            document = response.json()
        except (requests.RequestException, ValueError) as exc:
            raise DiscoveryError(f"discovery at {issuer} failed: {exc.__class__.__name__}") from exc
        # OpenID Connect Discovery 1.0 section 4.3: the issuer in the document must be ours exactly.
        if not isinstance(document, dict) or str(document.get("issuer", "")).rstrip("/") != issuer:
            raise DiscoveryError(f"discovery at {issuer} names another issuer")
        missing = [key for key in _DISCOVERED.values() if not document.get(key)]
        if missing:
            raise DiscoveryError(f"discovery at {issuer} lacks {', '.join(missing)}")
        _discovery_cache[issuer] = (now, document)
        return document


def clear_discovery_cache() -> None:
    _discovery_cache.clear()


def get_setting(attr: str, *default):
    """mozilla-django-oidc's settings, with the provider's endpoints taken from discovery."""
    if attr in _DISCOVERED:
        return discovery()[_DISCOVERED[attr]]
    return import_from_settings(attr, *default)


class Backend(OIDCAuthenticationBackend):
    """Authenticates the OIDC callback; permissions come from Django groups (ModelBackend)."""

    get_settings = staticmethod(get_setting)

    def __init__(self, *args, **kwargs):  # noqa: D401 - endpoints are resolved when used, not at import
        self.UserModel = get_user_model()

    def __getattr__(self, name):
        # The library reads self.OIDC_* attributes set in its __init__; resolve them lazily so that
        # building the backend (Django does it for every authenticate() call) never touches the network.
        if name.startswith("OIDC_"):
            defaults = {"OIDC_RP_SIGN_ALGO": "RS256", "OIDC_RP_IDP_SIGN_KEY": None}
            if name in defaults:
                return get_setting(name, defaults[name])
            return get_setting(name)
        raise AttributeError(name)

    def authenticate(self, request, **kwargs):
        # Only the callback view passes code_verifier: a password form that happens to carry
        # ?code=&state= must never start a token exchange.
        if request is None or "code_verifier" not in kwargs or not enabled():
            return None
        try:
            return super().authenticate(request, **kwargs)
        except DiscoveryError as exc:
            logger.warning("oidc sign-in failed: %s", exc)
            return None
        except requests.RequestException as exc:
            logger.warning("oidc sign-in failed talking to the provider: %s", exc.__class__.__name__)
            return None

    def verify_token(self, token, **kwargs):
        payload = super().verify_token(token, **kwargs)
        issuer = settings.OIDC_ISSUER.rstrip("/")
        if str(payload.get("iss", "")).rstrip("/") != issuer:
            raise SuspiciousOperation("ID token from another issuer")
        audience = payload.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if settings.OIDC_RP_CLIENT_ID not in audiences:
            raise SuspiciousOperation("ID token for another client")
        if len(audiences) > 1 and payload.get("azp") != settings.OIDC_RP_CLIENT_ID:
            raise SuspiciousOperation("ID token authorised for another party")
        return payload

    def verify_claims(self, claims):
        return bool(claims.get("sub"))

    def get_or_create_user(self, access_token, id_token, payload):
        claims = self.get_userinfo(access_token, id_token, payload)
        if not self.verify_claims(claims) or claims.get("sub") != payload.get("sub"):
            # OIDC Core 5.3.2: the userinfo sub must be the ID token's.
            raise SuspiciousOperation("userinfo subject does not match the ID token")
        subject = str(claims["sub"])
        user = directory.find_identity_user(provider=provider_id(), subject=subject)
        if user is None:
            if not settings.OIDC_CREATE_USER:
                logger.info("oidc sign-in refused: no account for this identity and OIDC_CREATE_USER is off")
                return None
            wanted = (claims.get(settings.OIDC_USERNAME_CLAIM) or
                      str(claims.get("email") or "").split("@")[0] or subject)
            user = self.UserModel(username=directory.free_username(str(wanted), user_model=self.UserModel))
            user.set_unusable_password()
        user.email = str(claims.get("email") or user.email or "")[:254]
        name = str(claims.get("name") or "")
        given, family = claims.get("given_name"), claims.get("family_name")
        if given or family:
            user.first_name, user.last_name = str(given or "")[:150], str(family or "")[:150]
        elif name:
            first, _, last = name.partition(" ")
            user.first_name, user.last_name = first[:150], last[:150]
        user.save()
        directory.link_identity(user=user, provider=provider_id(), subject=subject)
        groups = directory.clean_directory_groups(claims.get(settings.OIDC_GROUPS_CLAIM))
        changes = directory.apply_directory(user=user, directory_groups=groups, source="oidc")
        logger.info("oidc sign-in", extra={"user_id": user.pk, "groups_added": changes["added"],
                                           "groups_removed": changes["removed"]})
        return user


def _failed(request, message: str) -> HttpResponseRedirect:
    messages.error(request, message)
    return HttpResponseRedirect(settings.LOGIN_URL)


class AuthenticationRequestView(OIDCAuthenticationRequestView):
    get_settings = staticmethod(get_setting)

    def __init__(self, *args, **kwargs):  # endpoints resolved per request, inside get()
        super(OIDCAuthenticationRequestView, self).__init__(*args, **kwargs)

    def get(self, request):
        if not enabled():
            return _failed(request, _("Single sign-on is not configured."))
        try:
            self.OIDC_OP_AUTH_ENDPOINT = get_setting("OIDC_OP_AUTHORIZATION_ENDPOINT")
        except DiscoveryError as exc:
            logger.warning("oidc sign-in unavailable: %s", exc)
            return _failed(request, _("The identity provider cannot be reached. Please try again later."))
        self.OIDC_RP_CLIENT_ID = get_setting("OIDC_RP_CLIENT_ID")
        return super().get(request)


class AuthenticationCallbackView(OIDCAuthenticationCallbackView):
    get_settings = staticmethod(get_setting)

    def get(self, request):
        try:
            return super().get(request)
        except SuspiciousOperation as exc:
            logger.warning("oidc callback refused: %s", exc)
            return self.login_failure()

    def login_failure(self):
        return _failed(self.request, _("Single sign-on did not complete. Please try again."))


def end_session_url(request, id_token: str | None) -> str | None:
    """The provider's end-session URL for RP-initiated logout 1.0, or None (no OIDC session or endpoint)."""
    if not enabled() or not id_token:
        return None
    try:
        end_session = discovery().get("end_session_endpoint")
    except DiscoveryError:
        return None
    if not end_session:
        return None
    after = request.build_absolute_uri(settings.LOGOUT_REDIRECT_URL)
    query = urlencode({"id_token_hint": id_token, "post_logout_redirect_uri": after,
                       "client_id": settings.OIDC_RP_CLIENT_ID})
    return f"{end_session}?{query}"
