"""Writes for core objects (API keys)."""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext

from .errors import ApplicationError, NotFound
from .models import ApiKey

KEY_PREFIX = "ks_"


def hash_api_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    raw_key: str  # shown once; never stored


def api_key_create(*, user: AbstractBaseUser, name: str = "", expires_at: datetime | None = None) -> IssuedKey:
    if expires_at is not None and expires_at <= timezone.now():
        raise ApplicationError("invalid_expiry", gettext("expires_at must be in the future."))
    public = secrets.token_hex(4)
    raw = f"{KEY_PREFIX}{public}_{secrets.token_urlsafe(32)}"
    key = ApiKey.objects.create(
        user=user, name=name[:100], prefix=f"{KEY_PREFIX}{public}", key_hash=hash_api_key(raw), expires_at=expires_at
    )
    return IssuedKey(api_key=key, raw_key=raw)


def api_key_revoke(*, user: AbstractBaseUser, key_id: int) -> ApiKey:
    """Revoke one of `user`'s keys (staff may revoke anyone's). Idempotent."""
    with transaction.atomic():
        qs = ApiKey.objects.select_for_update()
        if not user.is_staff:
            qs = qs.filter(user=user)
        key = qs.filter(pk=key_id).first()
        if key is None:
            raise NotFound(gettext("No such API key."), code="api_key_not_found")
        if key.revoked_at is None:
            key.revoked_at = timezone.now()
            key.save(update_fields=["revoked_at"])
            api_key_revoked_publish(key_ids=[key.pk])
    return key


def api_key_revoked_publish(*, key_ids: list[int]) -> None:
    """Tell every instance (after the commit) to drop cached lookups of these keys. This process drops
    them at once as well: dropping is always safe, and the caller expects its own next request refused."""
    from . import auth_cache
    from .events import publish_on_commit

    for key_id in key_ids:
        auth_cache.drop_key(key_id)
        publish_on_commit("api_key_revoked", {"key_id": key_id})


def api_key_authenticate(*, raw_key: str) -> ApiKey | None:
    """The active key for `raw_key`, or None. Marks last use at most once a minute to spare writes.

    Lookups are cached per process for API_KEY_CACHE_SECONDS (apps.core.auth_cache): revocation
    publishes `api_key_revoked`, which drops the entry on every instance.
    """
    from . import auth_cache

    key_hash = hash_api_key(raw_key)
    key = auth_cache.get(key_hash)
    if key is None:
        key = ApiKey.objects.select_related("user").filter(key_hash=key_hash).first()
        if key is not None and key.is_active and key.user.is_active:
            auth_cache.put(key_hash, key)
    if key is None or not key.is_active or not key.user.is_active:
        return None
    now = timezone.now()
    if key.last_used_at is None or (now - key.last_used_at).total_seconds() > 60:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now  # the cached copy too, or every later hit would write again
    return key


def demo_admin_ensure(*, username: str, password: str) -> bool:
    """Create (or reset the password of) the demo superuser. Returns True when created."""
    from django.contrib.auth import get_user_model

    user, created = get_user_model().objects.get_or_create(
        username=username, defaults={"is_staff": True, "is_superuser": True, "email": f"{username}@example.com"}
    )
    user.is_staff = user.is_superuser = True
    user.set_password(password)
    user.save()
    return created
