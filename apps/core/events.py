"""Cluster event bus over the channel layer.

One envelope for every event: {"type", "id", "version", "origin", "ts", "payload"}. Events are
published only after the database commit. Delivery over the channel layer is at-most-once, so
handlers must be idempotent and every subscriber also re-checks the authoritative state
(see DESIGN.md, "Cluster events"). Handlers registered here run in-process for local events
immediately and, once the cluster listener is running, for events from other instances.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable

from django.conf import settings
from django.db import transaction

logger = logging.getLogger(__name__)

CLUSTER_GROUP = "kotaemon.cluster"
EVENT_TYPES = ("knowledge_updated", "plugin_config_updated", "api_key_revoked", "session_updated")

Handler = Callable[[dict[str, Any]], None]
_handlers: dict[str, list[Handler]] = {}
_seen_ids: OrderedDict[str, None] = OrderedDict()
_seen_lock = threading.Lock()
_SEEN_MAX = 10_000


def make_event(event_type: str, payload: dict[str, Any], *, version: int | None = None) -> dict[str, Any]:
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    return {"type": event_type, "id": uuid.uuid4().hex, "version": version, "origin": settings.INSTANCE_ID,
            "ts": time.time(), "payload": payload}


def register_handler(event_type: str, handler: Handler) -> None:
    """Handlers must be idempotent: the same logical change can arrive more than once."""
    if handler not in _handlers.setdefault(event_type, []):
        _handlers[event_type].append(handler)


def dispatch(event: dict[str, Any]) -> bool:
    """Apply an event locally once per id. Returns False for a duplicate. Handler errors are logged, not raised."""
    with _seen_lock:
        if event["id"] in _seen_ids:
            return False
        _seen_ids[event["id"]] = None
        while len(_seen_ids) > _SEEN_MAX:
            _seen_ids.popitem(last=False)
    for handler in _handlers.get(event["type"], []):
        try:
            handler(event)
        except Exception:
            logger.exception("cluster event handler failed", extra={"event_type": event["type"]})
    return True


def publish(event: dict[str, Any]) -> None:
    """Apply locally, then broadcast. A broadcast failure is logged: other instances heal by polling."""
    dispatch(event)
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    try:
        layer = get_channel_layer()
        async_to_sync(layer.group_send)(CLUSTER_GROUP, {"type": "cluster.event", "event": event})
    except Exception:
        logger.exception("cluster event broadcast failed", extra={"event_type": event["type"]})


def publish_on_commit(event_type: str, payload: dict[str, Any], *, version: int | None = None) -> None:
    """Publish after the surrounding transaction commits (immediately when there is none)."""
    event = make_event(event_type, payload, version=version)
    transaction.on_commit(lambda: publish(event))
