"""Login rate limiting for /accounts/login/ and /admin/login/: failed sign-ins are counted per client address
and per username (in the cache, i.e. Redis in production, so every instance shares the counts); past the
limit the login POST is refused with 429 before the password is checked, until the window ends.

Per username stops guessing one account's password from many addresses; per address stops trying many
accounts from one. A successful sign-in clears its username's count. Knowing a username lets anyone lock
that account's password sign-in for LOGIN_LOCKOUT_SECONDS: the price of stopping online guessing.
"""
from __future__ import annotations

import hashlib
import logging

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse
from django.utils.html import escape
from django.utils.translation import gettext as _

logger = logging.getLogger(__name__)


def _key(kind: str, value: str) -> str:
    return f"login:failures:{kind}:{hashlib.sha256(value.encode('utf-8')).hexdigest()[:32]}"


def _keys(request: HttpRequest, username: str) -> list[tuple[str, int]]:
    keys = [(_key("ip", request.META.get("REMOTE_ADDR", "") or "-"), settings.LOGIN_FAILURES_PER_IP)]
    if username:
        keys.append((_key("user", username.strip().lower()), settings.LOGIN_FAILURES_PER_USERNAME))
    return keys


def retry_after(request: HttpRequest, username: str) -> int | None:
    """Seconds until this login may be tried again, or None when it may be tried now."""
    try:
        for key, limit in _keys(request, username):
            if limit > 0 and int(cache.get(key) or 0) >= limit:
                ttl = cache.ttl(key) if hasattr(cache, "ttl") else None
                return int(ttl) if ttl and ttl > 0 else settings.LOGIN_LOCKOUT_SECONDS
    except Exception:  # a cache outage must not lock everybody out
        logger.warning("login rate limit unavailable", exc_info=True)
    return None


def note_failure(request: HttpRequest | None, username: str) -> None:
    if request is None:
        return
    try:
        for key, _limit in _keys(request, username):
            cache.add(key, 0, timeout=settings.LOGIN_LOCKOUT_SECONDS)
            try:
                cache.incr(key)
            except ValueError:
                cache.set(key, 1, timeout=settings.LOGIN_LOCKOUT_SECONDS)
    except Exception:
        logger.warning("login rate limit unavailable", exc_info=True)


def _on_login_failed(sender, credentials=None, request=None, **kwargs) -> None:
    note_failure(request, str((credentials or {}).get("username") or ""))


def _on_logged_in(sender, request=None, user=None, **kwargs) -> None:
    if user is not None:
        try:
            cache.delete(_key("user", user.get_username().strip().lower()))
        except Exception:
            logger.warning("login rate limit unavailable", exc_info=True)


def connect_signals() -> None:
    from django.contrib.auth.signals import user_logged_in, user_login_failed

    user_login_failed.connect(_on_login_failed, dispatch_uid="core.login_failed")
    user_logged_in.connect(_on_logged_in, dispatch_uid="core.logged_in")


class LoginRateLimitMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.method == "POST" and request.path in _login_paths():
            wait = retry_after(request, str(request.POST.get("username", "")))
            if wait is not None:
                minutes = max(1, (wait + 59) // 60)
                message = _("Too many failed sign-in attempts. Try again in %(minutes)s minute(s).") % {
                    "minutes": minutes}
                logger.warning("login refused by the rate limit", extra={"path": request.path})
                response = HttpResponse(f"<!doctype html><title>{escape(_('Sign-in paused'))}</title>"
                                        f"<p role=\"alert\">{escape(message)}</p>", status=429)
                response["Retry-After"] = str(wait)
                return response
        return self.get_response(request)


def _login_paths() -> set[str]:
    from django.urls import reverse

    return {settings.LOGIN_URL, reverse("admin:login")}
