"""Cluster event bus over the channel layer.

One envelope for every event: {"type", "id", "version", "origin", "ts", "payload"}. Events are
published only after the database commit. Delivery over the channel layer is at-most-once, so
handlers must be idempotent and every subscriber also re-checks the authoritative state
(apps.core.cluster runs the reconcilers; see docs/cluster.md).

Every event is applied at most once per process:
- a duplicate (an id this process has already applied) is ignored;
- a stale event (its version is not newer than the version this process holds for the same
  (type, key)) is ignored. The key names the thing the version belongs to: the knowledge base of a
  `knowledge_updated`, the session of a `session_updated`, ... (see `event_key`).

Handlers registered here run in-process for local events immediately and, once the cluster
listener is running (apps.core.cluster), for events from other instances.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable

from django.conf import settings
from django.db import transaction
from prometheus_client import Counter, Histogram

from apps.monitoring.metrics import REGISTRY

logger = logging.getLogger(__name__)

CLUSTER_GROUP = "kotaemon.cluster"
EVENT_TYPES = ("knowledge_updated", "plugin_config_updated", "api_key_revoked", "session_updated", "user_changed")
# Which payload field names the thing a version belongs to; the first present one wins. A type whose
# payload has none of them has one key ("") for all its events, i.e. one global version.
KEY_FIELDS: dict[str, tuple[str, ...]] = {
    "knowledge_updated": ("kb", "kb_id", "knowledge_base", "knowledge_base_id"),
    # One global key: the plugin registry's version counts every change of any plugin.
    "plugin_config_updated": (),
    "api_key_revoked": ("key_id", "prefix"),
    "session_updated": ("session_id", "session", "conversation_id"),
    # A user's account, groups or permissions changed (user_id None: a group's permissions, i.e. anyone).
    "user_changed": ("user_id",),
}
MAX_ID_LENGTH = 64

Handler = Callable[[dict[str, Any]], None]
KeyFunction = Callable[[dict[str, Any]], str]

_handlers: dict[str, list[Handler]] = {}
_key_functions: dict[str, KeyFunction] = {}

_SEEN_MAX = 10_000
_HELD_MAX = 50_000
_seen_ids: OrderedDict[str, None] = OrderedDict()
# (type, key) -> newest version applied here. Bounded: evicting a session's entry only means a late
# event for it could run its (idempotent) handler once more.
_held: OrderedDict[tuple[str, str], int] = OrderedDict()
_state_lock = threading.Lock()
# Striped locks serialise handling per (type, key): two versions of one knowledge base never run their
# handlers concurrently (v6 then a slower v5 would otherwise undo it), while unrelated events don't wait.
_STRIPES = [threading.RLock() for _ in range(64)]
_last_event: dict[str, Any] | None = None
_last_by_type: dict[str, dict[str, Any]] = {}
_counts: dict[str, int] = {"applied": 0, "duplicate": 0, "stale": 0, "failed": 0, "invalid": 0, "published": 0}

OUTCOMES = tuple(_counts)


class InvalidEvent(ValueError):
    """A message that is not a well-formed envelope of a known type."""


# --- metrics ---------------------------------------------------------------------------
EVENT_LAG = Histogram(
    "kotaemon_cluster_event_lag_seconds",
    "Seconds from publishing a cluster event to its arrival at another instance (wall clocks: skew adds)",
    ["type"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
EVENTS_TOTAL = Counter(
    "kotaemon_cluster_events_total",
    "Cluster events by type and outcome (published, applied, duplicate, stale, failed, invalid)",
    ["type", "outcome"], registry=REGISTRY,
)

_metrics_lock = threading.Lock()


def _count(event_type: str, outcome: str) -> None:
    with _metrics_lock:
        _counts[outcome] += 1
    EVENTS_TOTAL.labels(event_type, outcome).inc()


# --- envelope --------------------------------------------------------------------------
def make_event(event_type: str, payload: dict[str, Any], *, version: int | None = None) -> dict[str, Any]:
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    if not isinstance(payload, dict):
        raise ValueError("payload must be a dict")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
        raise ValueError("version must be a non-negative integer or None")
    return {"type": event_type, "id": uuid.uuid4().hex, "version": version, "origin": settings.INSTANCE_ID,
            "ts": time.time(), "payload": payload}


def validate_event(message: Any) -> dict[str, Any]:
    """The envelope if `message` is a well-formed event, else InvalidEvent. Messages come from the
    network (anyone who can write to Redis), so nothing is assumed."""
    if not isinstance(message, dict):
        raise InvalidEvent("an event must be a JSON object")
    missing = {"type", "id", "version", "origin", "ts", "payload"} - set(message)
    if missing:
        raise InvalidEvent(f"missing fields: {sorted(missing)}")
    if message["type"] not in EVENT_TYPES:
        raise InvalidEvent(f"unknown event type {str(message['type'])[:40]!r}")
    if not isinstance(message["id"], str) or not 0 < len(message["id"]) <= MAX_ID_LENGTH:
        raise InvalidEvent("id must be a non-empty string of at most 64 characters")
    version = message["version"]
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
        raise InvalidEvent("version must be a non-negative integer or null")
    ts = message["ts"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        raise InvalidEvent("ts must be a number")
    if not isinstance(message["payload"], dict):
        raise InvalidEvent("payload must be an object")
    if not isinstance(message["origin"], str):
        raise InvalidEvent("origin must be a string")
    return message


def register_key(event_type: str, key_function: KeyFunction) -> None:
    """Override how the version key of `event_type` is derived from an event (default: KEY_FIELDS)."""
    _key_functions[event_type] = key_function


def event_key(event: dict[str, Any]) -> str:
    function = _key_functions.get(event["type"])
    if function is not None:
        return str(function(event))
    payload = event["payload"]
    for field in KEY_FIELDS.get(event["type"], ()):
        if payload.get(field) is not None:
            return str(payload[field])
    return ""


# --- handlers and dispatch ----------------------------------------------------------------
def register_handler(event_type: str, handler: Handler) -> None:
    """Handlers must be idempotent: the same logical change can arrive more than once (the reconciler
    replays it when it suspects a missed event). A handler that raises leaves the event unapplied, so a
    later replay retries it."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    if handler not in _handlers.setdefault(event_type, []):
        _handlers[event_type].append(handler)


def _stripe(event_type: str, key: str) -> threading.RLock:
    digest = hashlib.blake2b(f"{event_type}\0{key}".encode(), digest_size=2).digest()
    return _STRIPES[int.from_bytes(digest, "big") % len(_STRIPES)]


def held_version(event_type: str, key: str = "") -> int | None:
    """The newest version of (type, key) applied in this process, or None."""
    with _state_lock:
        return _held.get((event_type, str(key)))


def seen(event_id: str) -> bool:
    """Whether this process has already handled (applied or ignored) the event with this id."""
    with _state_lock:
        return event_id in _seen_ids


def note_version(event_type: str, key: str, version: int) -> None:
    """Record that this process holds `version` of (type, key) without an event, e.g. after loading the
    active index from the database at start-up or while healing: a late event for it is then stale."""
    with _state_lock:
        _note_version_locked(event_type, str(key), version)


def _note_version_locked(event_type: str, key: str, version: int) -> None:
    current = _held.get((event_type, key))
    if current is None or version > current:
        _held[(event_type, key)] = version
    _held.move_to_end((event_type, key))
    while len(_held) > _HELD_MAX:
        _held.popitem(last=False)


def dispatch_outcome(event: dict[str, Any], *, remote: bool = False) -> str:
    """Apply an event locally at most once. Returns one of applied, duplicate, stale, failed, invalid.

    `remote` marks events that arrived from the channel layer (or a replay) rather than from a
    publish in this process: their lag is measured. Handler errors are logged, never raised."""
    global _last_event
    try:
        event = validate_event(event)
    except InvalidEvent as exc:
        logger.warning("invalid cluster event ignored: %s", exc)
        _count("unknown", "invalid")
        return "invalid"
    event_type, version = event["type"], event["version"]
    key = event_key(event)
    if remote:
        EVENT_LAG.labels(event_type).observe(max(0.0, time.time() - event["ts"]))
    with _stripe(event_type, key):
        with _state_lock:
            if event["id"] in _seen_ids:
                outcome = "duplicate"
            else:
                held = _held.get((event_type, key))
                outcome = "stale" if version is not None and held is not None and version <= held else "apply"
                # A stale event's id is remembered too, so its replays are cheap duplicates.
                _seen_ids[event["id"]] = None
                while len(_seen_ids) > _SEEN_MAX:
                    _seen_ids.popitem(last=False)
        if outcome != "apply":
            _count(event_type, outcome)
            return outcome
        failed = False
        for handler in list(_handlers.get(event_type, [])):
            try:
                handler(event)
            except Exception:
                failed = True
                logger.exception("cluster event handler failed",
                                 extra={"event_type": event_type, "event_id": event["id"]})
        with _state_lock:
            if failed:
                # Forget the id so a replay (reconciler) retries the whole event; handlers are idempotent.
                _seen_ids.pop(event["id"], None)
            else:
                if version is not None:
                    _note_version_locked(event_type, key, version)
                _last_event = {"id": event["id"], "type": event_type, "version": version, "key": key,
                               "origin": event["origin"], "ts": event["ts"], "received": time.time()}
                _last_by_type[event_type] = _last_event
    _count(event_type, "failed" if failed else "applied")
    return "failed" if failed else "applied"


def dispatch(event: dict[str, Any]) -> bool:
    """Apply an event locally once. Returns True when it was applied (False: duplicate, stale, invalid
    or a handler failed)."""
    return dispatch_outcome(event) == "applied"


def last_event() -> dict[str, Any] | None:
    with _state_lock:
        return dict(_last_event) if _last_event else None


def last_events() -> dict[str, dict[str, Any]]:
    """The last event applied here, per type (a chat's session events don't hide the last index update)."""
    with _state_lock:
        return {kind: dict(event) for kind, event in _last_by_type.items()}


def stats() -> dict[str, int]:
    with _metrics_lock:
        return dict(_counts)


def held_versions(event_type: str) -> dict[str, int]:
    with _state_lock:
        return {key: version for (kind, key), version in _held.items() if kind == event_type}


def _reset_for_tests() -> None:
    """Forget ids, versions and the last event (handlers stay registered)."""
    global _last_event
    with _state_lock:
        _seen_ids.clear()
        _held.clear()
        _last_by_type.clear()
        _last_event = None


# --- publishing ----------------------------------------------------------------------------
def _group_message(event: dict[str, Any]) -> dict[str, Any]:
    return {"type": "cluster.event", "event": event}


class _Broadcaster:
    """Sends to the cluster group from one long-lived event loop and channel-layer instance per process.

    async_to_sync per publish would open a new loop (and a new channels-redis connection pool) per
    event in sync contexts such as Celery workers, the churn behind channels_redis#279. The in-memory
    layer is process-local, so it is used directly (nothing else could hear it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._loop: Any = None
        self._layer: Any = None
        self._config: str | None = None

    def _ensure(self):
        import asyncio
        import os

        from channels.layers import channel_layers

        config = repr(settings.CHANNEL_LAYERS.get("default"))
        with self._lock:
            if self._pid != os.getpid() or self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="cluster-broadcast", daemon=True).start()
                self._loop, self._layer, self._pid = loop, None, os.getpid()
            if self._layer is None or self._config != config:  # settings overridden (tests)
                self._layer, self._config = channel_layers.make_backend("default"), config
            return self._loop, self._layer

    def send(self, message: dict[str, Any], timeout: float) -> None:
        import asyncio

        backend = settings.CHANNEL_LAYERS.get("default", {}).get("BACKEND", "")
        if "InMemory" in backend:
            from asgiref.sync import async_to_sync
            from channels.layers import get_channel_layer

            async_to_sync(get_channel_layer().group_send)(CLUSTER_GROUP, message)
            return
        loop, layer = self._ensure()
        asyncio.run_coroutine_threadsafe(layer.group_send(CLUSTER_GROUP, message), loop).result(timeout)


_broadcaster = _Broadcaster()


def publish(event: dict[str, Any]) -> None:
    """Apply locally, record in the journal, then broadcast. Never raises for a broadcast failure:
    other instances heal from the journal or their own checks (bounded staleness). Blocks for at most
    about 2 x REDIS_TIMEOUT; call it from sync code (apublish from async code)."""
    validate_event(event)
    dispatch_outcome(event)
    _count(event["type"], "published")
    from . import registry

    registry.journal_record(event)
    try:
        _broadcaster.send(_group_message(event), timeout=max(1.0, 2 * settings.REDIS_TIMEOUT))
    except Exception:
        logger.warning("cluster event broadcast failed", extra={"event_type": event["type"]}, exc_info=True)


async def apublish(event: dict[str, Any]) -> None:
    """publish() for async code (websocket consumers): the local handlers run in a thread."""
    from asgiref.sync import sync_to_async

    await sync_to_async(publish, thread_sensitive=False)(event)


def publish_on_commit(event_type: str, payload: dict[str, Any], *, version: int | None = None) -> dict[str, Any]:
    """Publish after the surrounding transaction commits (immediately when there is none); a rollback
    publishes nothing. Returns the envelope; its ts is set when it is actually sent."""
    event = make_event(event_type, payload, version=version)

    def send() -> None:
        event["ts"] = time.time()
        publish(event)

    transaction.on_commit(send)
    return event
