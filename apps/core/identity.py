"""Fresh identities for long-lived connections, and the `user_changed` event that keeps them fresh.

A websocket lives for hours; the user object it authenticated with must not. Every change to a user
(deactivation, groups, permissions) or to a group's permissions publishes `user_changed` after commit;
every instance drops its cached copies (this module's and the API-key lookup cache), and the TTL
(API_KEY_CACHE_SECONDS) bounds staleness if the event is lost (the journal replays it as well).
"""
from __future__ import annotations

import threading
import time
from typing import Any

from django.conf import settings

_lock = threading.Lock()
_users: dict[int, tuple[float, Any]] = {}  # user id -> (expires, user)
_MAX = 10_000


def user_fresh(user_id: int) -> Any | None:
    """The user row as it is now (cached for API_KEY_CACHE_SECONDS), or None when it no longer exists.
    The object is shared between connections of this process: callers must not modify it."""
    from django.contrib.auth import get_user_model

    ttl = settings.API_KEY_CACHE_SECONDS
    now = time.monotonic()
    with _lock:
        entry = _users.get(user_id)
        if entry is not None and entry[0] > now:
            return entry[1]
    user = get_user_model().objects.filter(pk=user_id).first()
    if user is not None and ttl > 0:
        with _lock:
            if len(_users) >= _MAX:
                _users.clear()
            _users[user_id] = (now + ttl, user)
    return user


def drop_user(user_id: int | None) -> None:
    """Forget cached copies of one user (None: of everyone), here and in the API-key lookup cache."""
    from . import auth_cache

    with _lock:
        if user_id is None:
            _users.clear()
        else:
            _users.pop(user_id, None)
    if user_id is None:
        auth_cache.clear()
    else:
        auth_cache.drop_user(user_id)


def on_user_changed(event: dict[str, Any]) -> None:
    """events handler (idempotent)."""
    user_id = event["payload"].get("user_id")
    drop_user(user_id if isinstance(user_id, int) and not isinstance(user_id, bool) else None)


def user_changed_publish(user_id: int | None) -> None:
    from .events import publish_on_commit

    drop_user(user_id)
    publish_on_commit("user_changed", {"user_id": user_id})


def _on_user_saved(sender, instance, created=False, raw=False, update_fields=None, **kwargs) -> None:
    # A login only stamps last_login: nothing an authorization decision reads.
    if not created and not raw and set(update_fields or ()) != {"last_login"}:
        user_changed_publish(instance.pk)


def _on_user_deleted(sender, instance, **kwargs) -> None:
    user_changed_publish(instance.pk)


def _on_user_m2m(sender, instance, action, reverse=False, pk_set=None, **kwargs) -> None:
    if not action.startswith("post_"):
        return
    from django.contrib.auth import get_user_model

    if isinstance(instance, get_user_model()):
        user_changed_publish(instance.pk)
    else:  # a group's members or permissions changed: its members, whoever they are
        user_changed_publish(None)


def _on_group_changed(sender, instance, **kwargs) -> None:
    user_changed_publish(None)


def connect_signals() -> None:
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group
    from django.db.models.signals import m2m_changed, post_delete, post_save

    User = get_user_model()
    post_save.connect(_on_user_saved, sender=User, dispatch_uid="identity.user_saved")
    post_delete.connect(_on_user_deleted, sender=User, dispatch_uid="identity.user_deleted")
    post_delete.connect(_on_group_changed, sender=Group, dispatch_uid="identity.group_deleted")
    m2m_changed.connect(_on_user_m2m, sender=User.groups.through, dispatch_uid="identity.user_groups")
    m2m_changed.connect(_on_user_m2m, sender=User.user_permissions.through, dispatch_uid="identity.user_perms")
    m2m_changed.connect(_on_user_m2m, sender=Group.permissions.through, dispatch_uid="identity.group_perms")
