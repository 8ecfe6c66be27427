"""A short per-process cache of API-key lookups.

Why: every API request authenticates, and a chat turn from a busy integration repeats the same key many
times a second; the cache saves a database round trip (and a connection) per request. Why it is safe:
revoking or deleting a key publishes `api_key_revoked` after the commit and every instance drops the
entry at once; if that event is lost, the journal replay drops it within CLUSTER_RECONCILE_SECONDS and
the TTL (API_KEY_CACHE_SECONDS, default 5 s) bounds the window regardless. Expiry and user deactivation
are re-checked on every hit; deactivation is bounded by the TTL.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

from django.conf import settings

_MAX_ENTRIES = 10_000
_lock = threading.Lock()
_entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()  # key_hash -> (expires, ApiKey)


def get(key_hash: str) -> Any | None:
    ttl = settings.API_KEY_CACHE_SECONDS
    if ttl <= 0:
        return None
    with _lock:
        entry = _entries.get(key_hash)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del _entries[key_hash]
            return None
        _entries.move_to_end(key_hash)
        return entry[1]


def put(key_hash: str, api_key: Any) -> None:
    ttl = settings.API_KEY_CACHE_SECONDS
    if ttl <= 0:
        return
    with _lock:
        _entries[key_hash] = (time.monotonic() + ttl, api_key)
        _entries.move_to_end(key_hash)
        while len(_entries) > _MAX_ENTRIES:
            _entries.popitem(last=False)


def drop_key(key_id: int) -> int:
    """Forget every cached lookup of key `key_id`; returns how many entries were dropped."""
    with _lock:
        stale = [h for h, (_, key) in _entries.items() if key.pk == key_id]
        for key_hash in stale:
            del _entries[key_hash]
    return len(stale)


def drop_user(user_id: int) -> int:
    """Forget every cached key of user `user_id` (its cached user object is stale after a user change)."""
    with _lock:
        stale = [h for h, (_, key) in _entries.items() if key.user_id == user_id]
        for key_hash in stale:
            del _entries[key_hash]
    return len(stale)


def clear() -> None:
    with _lock:
        _entries.clear()


def size() -> int:
    with _lock:
        return len(_entries)


def on_api_key_revoked(event: dict[str, Any]) -> None:
    """events handler: idempotent (dropping twice drops nothing the second time)."""
    key_id = event["payload"].get("key_id")
    if isinstance(key_id, int) and not isinstance(key_id, bool):
        drop_key(key_id)
    else:  # an event without a usable id: dropping everything is always safe
        clear()
