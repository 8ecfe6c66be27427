"""Hot conversation state with a TTL, optimistic concurrency and a per-process cache.

One interface (SessionStore: get, set, delete, update) and two implementations, chosen by
SESSION_STORE_BACKEND: "memory" (one process, the embedded default) and "redis" (shared by every
instance; the django-redis connection pool). The database stays the source of truth: a state that
expired or was flushed is rebuilt from the messages (see selectors.session_state_get).

What is written is the same for both backends: JSON with personal data masked
(sensitive.mask_text), zlib-compressed above SESSION_STATE_COMPRESS_BYTES, and trimmed from the
oldest turns to fit SESSION_STATE_MAX_BYTES (a large state is shortened, never rejected).

Versions only grow, also across expiry (a new version is at least the server's clock in microseconds), so a
compare-and-set against a stale cached copy can never succeed by accident (no ABA).
"""
from __future__ import annotations

import copy
import json
import logging
import random
import threading
import time
import zlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from django.conf import settings
from django.utils.translation import gettext

from apps.core.errors import ApplicationError

from . import metrics
from .sensitive import mask_value

logger = logging.getLogger(__name__)

_PLAIN = b"j"
_ZLIB = b"z"
MAX_UPDATE_ATTEMPTS = 64

Updater = Callable[[dict[str, Any] | None], dict[str, Any] | None]


@dataclass(frozen=True)
class SessionState:
    version: int
    data: dict[str, Any]


# --- encoding -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Codec:
    compress_bytes: int
    max_bytes: int
    mask: bool = True

    def _pack(self, data: dict[str, Any]) -> bytes:
        raw = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if len(raw) > self.compress_bytes:
            return _ZLIB + zlib.compress(raw, 6)
        return _PLAIN + raw

    def encode(self, data: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        """The bytes to write and the state they hold (masked and possibly trimmed)."""
        stored = mask_value(data) if self.mask else copy.deepcopy(data)
        blob = self._pack(stored)
        if len(blob) <= self.max_bytes:
            return blob, stored
        turns = stored.get("turns")
        dropped = 0
        if isinstance(turns, list):
            # Drop the oldest turns first; estimate how many from the size, then correct one by one.
            while len(blob) > self.max_bytes and len(turns) > 1:
                excess = len(blob) / self.max_bytes
                n = max(1, min(len(turns) - 1, int(len(turns) * (1 - 1 / excess) * 0.9)))
                del turns[:n]
                dropped += n
                blob = self._pack(stored)
            if len(blob) > self.max_bytes and turns:
                # One huge turn: keep its most recent text.
                last = turns[-1]
                content = str(last.get("content", ""))
                while len(blob) > self.max_bytes and content:
                    content = content[len(content) // 2:]
                    last["content"] = "…" + content
                    blob = self._pack(stored)
        # Anything else that is still too large (e.g. a giant last_query) is cut, keeping its end.
        for key in sorted(stored, key=lambda k: -len(str(stored[k]))):
            if len(blob) <= self.max_bytes:
                break
            if isinstance(stored[key], str):
                stored[key] = stored[key][-max(0, self.max_bytes // 4):]
                blob = self._pack(stored)
        if dropped:
            stored["trimmed_turns"] = int(stored.get("trimmed_turns", 0)) + dropped
            metrics.session_store_trimmed_turns_total.inc(dropped)
            blob = self._pack(stored)
        if len(blob) > self.max_bytes:
            # Only fixed-size fields are left; writing a minimal state beats failing a chat turn.
            stored = {k: v for k, v in stored.items() if not isinstance(v, (str, list, dict))}
            blob = self._pack(stored)
        return blob, stored

    @staticmethod
    def decode(blob: bytes) -> dict[str, Any]:
        kind, body = blob[:1], blob[1:]
        if kind == _ZLIB:
            body = zlib.decompress(body)
        elif kind != _PLAIN:
            raise ValueError("unknown session state encoding")
        return json.loads(body.decode("utf-8"))


def default_codec() -> Codec:
    return Codec(compress_bytes=settings.SESSION_STATE_COMPRESS_BYTES, max_bytes=settings.SESSION_STATE_MAX_BYTES)


def _now_us() -> int:
    return time.time_ns() // 1000


# --- interface ----------------------------------------------------------------------------

class SessionStore(ABC):
    """get/set/delete/update of one JSON state per session id, each with a TTL refreshed on use.

    update(session_id, fn) applies fn(current data or None) -> new data (or None for "no change")
    atomically: if another writer got in between, fn is called again on the newer state, so fn
    must be a pure function of its argument.
    """

    tier = "store"

    def __init__(self, *, ttl_seconds: int, codec: Codec):
        self.ttl_seconds = ttl_seconds
        self.codec = codec

    @abstractmethod
    def get(self, session_id: str) -> SessionState | None: ...

    @abstractmethod
    def set(self, session_id: str, data: dict[str, Any]) -> SessionState: ...

    @abstractmethod
    def delete(self, session_id: str) -> None: ...

    @abstractmethod
    def update(self, session_id: str, fn: Updater) -> SessionState | None: ...

    def invalidate_local(self, session_id: str, *, version: int | None = None) -> None:
        """Drop a per-process cached copy (no-op for stores without one)."""

    def _conflict(self, attempt: int) -> None:
        metrics.session_store_conflicts_total.inc()
        if attempt > 2:
            # Back off with jitter so that many writers on one hot session make progress.
            time.sleep(min(0.05, 0.001 * (2 ** min(attempt, 6))) * random.random())


def _busy(session_id: str) -> ApplicationError:
    return ApplicationError("session_busy", gettext("The conversation is being updated by too many requests at once; retry."),
                            details={"session_id": session_id}, status=409)


# --- in-memory ----------------------------------------------------------------------------

class MemorySessionStore(SessionStore):
    """One process only (the embedded default). Holds the encoded bytes, so behaviour (masking,
    trimming, copies) is identical to Redis."""

    tier = "memory"

    def __init__(self, *, ttl_seconds: int, codec: Codec, max_entries: int = 100_000):
        super().__init__(ttl_seconds=ttl_seconds, codec=codec)
        self._items: OrderedDict[str, tuple[int, bytes, float]] = OrderedDict()
        self._lock = threading.RLock()
        self._max_entries = max_entries

    def _live(self, session_id: str) -> tuple[int, bytes] | None:
        item = self._items.get(session_id)
        if item is None:
            return None
        version, blob, expires = item
        now = time.monotonic()
        if expires <= now:
            del self._items[session_id]
            return None
        self._items[session_id] = (version, blob, now + self.ttl_seconds)
        self._items.move_to_end(session_id)
        return version, blob

    def _put(self, session_id: str, version: int, blob: bytes) -> None:
        self._items[session_id] = (version, blob, time.monotonic() + self.ttl_seconds)
        self._items.move_to_end(session_id)
        while len(self._items) > self._max_entries:
            self._items.popitem(last=False)

    def get(self, session_id: str) -> SessionState | None:
        with self._lock:
            live = self._live(session_id)
        metrics.session_store_lookups_total.labels(self.tier, "hit" if live else "miss").inc()
        return SessionState(live[0], self.codec.decode(live[1])) if live else None

    def set(self, session_id: str, data: dict[str, Any]) -> SessionState:
        blob, stored = self.codec.encode(data)
        with self._lock:
            live = self._live(session_id)
            version = max((live[0] if live else 0) + 1, _now_us())
            self._put(session_id, version, blob)
        return SessionState(version, stored)

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._items.pop(session_id, None)

    def update(self, session_id: str, fn: Updater) -> SessionState | None:
        # The lock makes read-modify-write atomic; fn runs once.
        with self._lock:
            live = self._live(session_id)
            current = self.codec.decode(live[1]) if live else None
            new = fn(copy.deepcopy(current) if current is not None else None)
            if new is None:
                return SessionState(live[0], current) if live else None
            blob, stored = self.codec.encode(new)
            version = max((live[0] if live else 0) + 1, _now_us())
            self._put(session_id, version, blob)
        return SessionState(version, stored)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# --- Redis --------------------------------------------------------------------------------

# KEYS[1] = state key. ARGV: expected version ("*" = unconditional, "0" = must not exist), data, ttl ms.
# Returns {1, new_version} or {0, current_version, current_data}.
_CAS_LUA = """
local cur = redis.call('HGET', KEYS[1], 'v')
if not cur then cur = '0' end
if ARGV[1] ~= '*' and cur ~= ARGV[1] then
  return {0, cur, redis.call('HGET', KEYS[1], 'd')}
end
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local nv = math.max(tonumber(cur) + 1, now_us)
local nvs = string.format('%.0f', nv)
redis.call('HSET', KEYS[1], 'v', nvs, 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, nvs}
"""


@dataclass
class _LocalEntry:
    version: int
    data: dict[str, Any]
    fetched_at: float


class LocalCache:
    """A small LRU of decoded states in front of Redis. Entries are dropped when another instance
    changes the session (session_updated event) and are re-validated after max_age seconds anyway,
    because cluster events are delivered at most once."""

    def __init__(self, *, size: int, max_age: float):
        self.size = size
        self.max_age = max_age
        self._items: OrderedDict[str, _LocalEntry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_id: str) -> _LocalEntry | None:
        if self.size <= 0:
            return None
        with self._lock:
            entry = self._items.get(session_id)
            if entry is None:
                return None
            if time.monotonic() - entry.fetched_at > self.max_age:
                del self._items[session_id]
                return None
            self._items.move_to_end(session_id)
            return entry

    def put(self, session_id: str, version: int, data: dict[str, Any]) -> None:
        if self.size <= 0:
            return
        with self._lock:
            current = self._items.get(session_id)
            if current is not None and current.version > version:
                return  # a newer copy got here first
            self._items[session_id] = _LocalEntry(version, data, time.monotonic())
            self._items.move_to_end(session_id)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def drop(self, session_id: str, *, older_than: int | None = None) -> bool:
        with self._lock:
            entry = self._items.get(session_id)
            if entry is None or (older_than is not None and entry.version >= older_than):
                return False
            del self._items[session_id]
            return True

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class RedisSessionStore(SessionStore):
    tier = "redis"

    def __init__(self, *, client, ttl_seconds: int, codec: Codec, key_prefix: str, local_cache_size: int,
                 local_max_age: float = 30.0, publish_events: bool = True):
        super().__init__(ttl_seconds=ttl_seconds, codec=codec)
        self.client = client
        self.key_prefix = key_prefix
        # A local copy must be re-read well within the TTL so that use keeps refreshing it in Redis.
        self.local = LocalCache(size=local_cache_size, max_age=min(local_max_age, ttl_seconds / 2))
        self.publish_events = publish_events
        self._cas = client.register_script(_CAS_LUA)

    def key(self, session_id: str) -> str:
        return f"{self.key_prefix}:{session_id}"

    @property
    def _ttl_ms(self) -> int:
        return int(self.ttl_seconds * 1000)

    def _fetch(self, session_id: str) -> SessionState | None:
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.key(session_id), "v", "d")
        pipe.pexpire(self.key(session_id), self._ttl_ms)  # refreshed on use
        (version, blob), _ = pipe.execute()
        metrics.session_store_lookups_total.labels("redis", "hit" if blob else "miss").inc()
        data = self._decode(blob) if blob else None
        if data is None:
            return None
        state = SessionState(int(version), data)
        self.local.put(session_id, state.version, state.data)
        return state

    def get(self, session_id: str) -> SessionState | None:
        entry = self.local.get(session_id)
        if entry is not None:
            metrics.session_store_lookups_total.labels("local", "hit").inc()
            return SessionState(entry.version, copy.deepcopy(entry.data))
        metrics.session_store_lookups_total.labels("local", "miss").inc()
        state = self._fetch(session_id)
        return SessionState(state.version, copy.deepcopy(state.data)) if state else None

    def _write(self, session_id: str, expected: str, data: dict[str, Any]):
        blob, stored = self.codec.encode(data)
        result = self._cas(keys=[self.key(session_id)], args=[expected, blob, self._ttl_ms])
        if int(result[0]) == 1:
            state = SessionState(int(result[1]), stored)
            self.local.put(session_id, state.version, stored)
            self._announce(session_id, state.version)
            return True, state
        current_version = int(result[1])
        current_blob = result[2] if len(result) > 2 else None  # a Lua nil ends the reply array
        if current_version == 0:
            return False, None
        # An unreadable current state is replaced: fn sees it as missing ({} is falsy to callers).
        return False, SessionState(current_version, (self._decode(current_blob) if current_blob else None) or {})

    def _decode(self, blob: bytes) -> dict[str, Any] | None:
        try:
            return self.codec.decode(blob)
        except (ValueError, zlib.error):
            # Unreadable state (e.g. written by an incompatible release): treat it as missing; the
            # database rebuilds it.
            logger.warning("unreadable session state ignored")
            return None

    def set(self, session_id: str, data: dict[str, Any]) -> SessionState:
        ok, state = self._write(session_id, "*", data)
        assert ok
        return SessionState(state.version, copy.deepcopy(state.data))

    def delete(self, session_id: str) -> None:
        self.client.delete(self.key(session_id))
        self.local.drop(session_id)
        self._announce(session_id, None)

    def update(self, session_id: str, fn: Updater) -> SessionState | None:
        entry = self.local.get(session_id)
        current = SessionState(entry.version, entry.data) if entry else self._fetch(session_id)
        for attempt in range(MAX_UPDATE_ATTEMPTS):
            new = fn(copy.deepcopy(current.data) if current and current.data else None)
            if new is None:
                return SessionState(current.version, copy.deepcopy(current.data)) if current else None
            ok, state = self._write(session_id, str(current.version) if current else "0", new)
            if ok:
                return SessionState(state.version, copy.deepcopy(state.data))
            self.local.drop(session_id)
            current = state
            self._conflict(attempt)
        raise _busy(session_id)

    def invalidate_local(self, session_id: str, *, version: int | None = None) -> None:
        self.local.drop(session_id, older_than=version)

    def _announce(self, session_id: str, version: int | None) -> None:
        if not self.publish_events:
            return
        from apps.core.events import publish_on_commit

        try:
            publish_on_commit("session_updated", {"session_id": session_id}, version=version)
        except Exception:
            # Other instances re-validate their copies after local_max_age anyway.
            logger.exception("session_updated publish failed")


# --- the configured store -----------------------------------------------------------------

_store: SessionStore | None = None
_store_lock = threading.Lock()


def build_store(backend: str | None = None) -> SessionStore:
    backend = backend or settings.SESSION_STORE_BACKEND
    ttl = settings.SESSION_STATE_TTL_SECONDS
    if backend == "memory":
        return MemorySessionStore(ttl_seconds=ttl, codec=default_codec())
    if backend == "redis":
        from django_redis import get_redis_connection

        return RedisSessionStore(
            client=get_redis_connection("default"), ttl_seconds=ttl, codec=default_codec(),
            key_prefix=f"{settings.CACHE_KEY_PREFIX}:conv", local_cache_size=settings.SESSION_LOCAL_CACHE_SIZE,
            local_max_age=getattr(settings, "SESSION_LOCAL_CACHE_SECONDS", 30.0),
        )
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(f"SESSION_STORE_BACKEND must be 'memory' or 'redis', not {backend!r}.")


def get_session_store() -> SessionStore:
    global _store
    if _store is None:
        with _store_lock:
            if _store is None:
                _store = build_store()
    return _store


def session_store_reset() -> None:
    """Forget the configured store (after settings change, in tests)."""
    global _store
    with _store_lock:
        _store = None


def session_local_invalidate(session_id: str, *, version: int | None = None) -> None:
    """Drop this process's cached copy of a session, unless it is already at least `version`."""
    store = _store
    if store is not None:
        store.invalidate_local(session_id, version=version)


def on_session_updated(event: dict[str, Any]) -> None:
    """Cluster event handler (registered in AppConfig.ready); idempotent."""
    session_id = (event.get("payload") or {}).get("session_id")
    if isinstance(session_id, str):
        session_local_invalidate(session_id, version=event.get("version"))
