"""Writes for core objects (API keys)."""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext

from .errors import ApplicationError, NotFound, PermissionDenied
from .models import SCOPES, ApiKey, all_scopes

KEY_PREFIX = "ks_"


def hash_api_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    raw_key: str  # shown once; never stored


def _scopes_clean(scopes: Iterable[str] | None) -> list[str]:
    if scopes is None:
        return all_scopes()
    if isinstance(scopes, str) or not all(isinstance(s, str) for s in scopes):
        raise ApplicationError("invalid_scopes", gettext("scopes is a list of scope names."),
                               details={"allowed": all_scopes()})
    wanted = sorted(set(scopes))
    unknown = [s for s in wanted if s not in SCOPES]
    if unknown or not wanted:
        raise ApplicationError("invalid_scopes", gettext("Unknown or empty scopes."),
                               details={"unknown": unknown, "allowed": all_scopes()})
    return [s for s in SCOPES if s in wanted]


def api_key_create(*, user: AbstractBaseUser, name: str = "", expires_at: datetime | None = None,
                   scopes: Iterable[str] | None = None, parent: ApiKey | None = None,
                   issued_by: AbstractBaseUser | None = None) -> IssuedKey:
    """Issue a key for `user`.

    `parent`: the key the request authenticated with, when a key mints a key. The new key then needs
    the parent's `keys` scope, gets at most the parent's scopes (default: the same) and never outlives
    it (default: the parent's expiry); revoking the parent revokes it. `issued_by`: the person issuing,
    when not `user` themselves; only superusers may issue keys for others (the row is audited).
    """
    from . import authz

    if issued_by is not None and issued_by.pk != user.pk:
        authz.require(issued_by, "api_keys.issue_for_others")
    now = timezone.now()
    if expires_at is not None and expires_at <= now:
        raise ApplicationError("invalid_expiry", gettext("expires_at must be in the future."))
    if parent is not None:
        if parent.user_id != user.pk:
            raise PermissionDenied(gettext("A key can only mint keys for its own user."), code="permission_denied")
        if not parent.is_active:
            raise PermissionDenied(gettext("The key used is no longer active."), code="api_key_inactive")
        if "keys" not in (parent.scopes or []):
            raise PermissionDenied(gettext("This API key lacks the 'keys' scope needed to create keys."),
                                   code="scope_missing", details={"required": "keys"})
        wanted = _scopes_clean(scopes if scopes is not None else parent.scopes)
        wider = sorted(set(wanted) - set(parent.scopes or []))
        if wider:
            raise PermissionDenied(gettext("A key cannot create a key with wider scopes than its own."),
                                   code="scope_escalation", details={"scopes": wider})
        if parent.expires_at is not None:
            if expires_at is None:
                expires_at = parent.expires_at
            elif expires_at > parent.expires_at:
                raise PermissionDenied(gettext("A key cannot create a key that outlives it."), code="expiry_escalation",
                                       details={"max_expires_at": parent.expires_at.isoformat()})
    else:
        wanted = _scopes_clean(scopes)
    public = secrets.token_hex(4)
    raw = f"{KEY_PREFIX}{public}_{secrets.token_urlsafe(32)}"
    key = ApiKey.objects.create(
        user=user, name=name[:100], prefix=f"{KEY_PREFIX}{public}", key_hash=hash_api_key(raw), expires_at=expires_at,
        scopes=wanted, parent=parent,
        created_by=issued_by if issued_by is not None and issued_by.pk != user.pk else None,
    )
    return IssuedKey(api_key=key, raw_key=raw)


def _descendant_ids(key_ids: list[int]) -> list[int]:
    """Every key minted, directly or not, by the given keys (breadth first; the given ones excluded)."""
    found: list[int] = []
    frontier = list(key_ids)
    while frontier:
        frontier = list(ApiKey.objects.filter(parent_id__in=frontier).values_list("pk", flat=True))
        frontier = [pk for pk in frontier if pk not in found]
        found.extend(frontier)
    return found


def api_key_revoke(*, user: AbstractBaseUser, key_id: int) -> ApiKey:
    """Revoke one of `user`'s keys (key administrators: anyone's), and every key minted from it. Idempotent."""
    from . import authz

    with transaction.atomic():
        key = ApiKey.objects.select_for_update().filter(pk=key_id).first()
        if key is None or not authz.can(user, "api_keys.revoke", key):
            raise NotFound(gettext("No such API key."), code="api_key_not_found")
        now = timezone.now()
        revoked = []
        if key.revoked_at is None:
            key.revoked_at = now
            key.save(update_fields=["revoked_at"])
            revoked.append(key.pk)
        # One save per key, not update(): each revocation is audited and announced like the first.
        for child in ApiKey.objects.select_for_update().filter(pk__in=_descendant_ids([key.pk]),
                                                                revoked_at__isnull=True):
            child.revoked_at = now
            child.save(update_fields=["revoked_at"])
            revoked.append(child.pk)
        if revoked:
            api_key_revoked_publish(key_ids=revoked)
    return key


def api_key_descendants(*, key_ids: list[int]) -> list[int]:
    """Ids of the keys minted from these (for callers that delete keys and must announce all of them)."""
    return _descendant_ids(list(key_ids))


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
