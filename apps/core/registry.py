"""Instance registry and event journal, in Redis (a process-local stand-in when REDIS_URL is unset).

Registry: every instance (ASGI server or Celery worker process) writes its record under
`<prefix>:cluster:instance:<id>` with a TTL on each heartbeat, and its id into a sorted set scored by
heartbeat time, so listing needs no SCAN and a killed instance vanishes after the TTL.

Journal: the newest envelope of each (type, key), written after the commit by whoever published it.
Instances compare it with the versions they hold and replay what they missed; channel-layer delivery
is at-most-once, the journal is what bounds staleness. Session events are not journaled (one per chat
turn; the session store checks versions itself).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from django.conf import settings

logger = logging.getLogger(__name__)

JOURNALED_TYPES = ("knowledge_updated", "plugin_config_updated", "api_key_revoked", "user_changed")

# Keep the journal entry only if it is newer than the stored one (per field), atomically: two publishers
# racing must not let an older version overwrite a newer one.
_JOURNAL_SCRIPT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local ok, decoded = pcall(cjson.decode, current)
  local new_version = tonumber(ARGV[3])
  if ok and new_version and decoded['version'] ~= cjson.null and decoded['version'] ~= nil
     and tonumber(decoded['version']) >= new_version then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

_client_lock = threading.Lock()
_client: Any = None
_client_key: tuple | None = None

# Process-local stand-in (no Redis: one process is the whole cluster).
_local_lock = threading.Lock()
_local_instances: dict[str, tuple[float, dict[str, Any]]] = {}
_local_journal: dict[str, dict[str, Any]] = {}


def _prefix() -> str:
    return f"{settings.CACHE_KEY_PREFIX}:cluster"


def instance_key(instance_id: str) -> str:
    return f"{_prefix()}:instance:{instance_id}"


def index_key() -> str:
    return f"{_prefix()}:instances"


def journal_key() -> str:
    return f"{_prefix()}:journal"


def redis_client():
    """A redis-py client for REDIS_URL, one per process (re-created after fork), or None."""
    global _client, _client_key
    if not settings.REDIS_URL:
        return None
    key = (os.getpid(), settings.REDIS_URL)
    with _client_lock:
        if _client is None or _client_key != key:
            import redis

            _client = redis.Redis.from_url(
                settings.REDIS_URL, socket_timeout=settings.REDIS_TIMEOUT,
                socket_connect_timeout=settings.REDIS_TIMEOUT, health_check_interval=30,
            )
            _client_key = key
        return _client


def ttl_seconds() -> int:
    return max(1, int(settings.CLUSTER_INSTANCE_TTL_SECONDS))


# --- registry --------------------------------------------------------------------------------
def heartbeat(record: dict[str, Any]) -> None:
    """Write this instance's record (must contain "id") with the TTL. Raises on Redis errors: the
    caller decides how loudly to fail."""
    now = time.time()
    record = dict(record, heartbeat=now)
    client = redis_client()
    if client is None:
        with _local_lock:
            _local_instances[record["id"]] = (now + ttl_seconds(), record)
        return
    pipe = client.pipeline(transaction=False)
    pipe.set(instance_key(record["id"]), json.dumps(record, default=str), ex=ttl_seconds())
    pipe.zadd(index_key(), {record["id"]: now})
    pipe.execute()


def deregister(instance_id: str) -> None:
    client = redis_client()
    if client is None:
        with _local_lock:
            _local_instances.pop(instance_id, None)
        return
    pipe = client.pipeline(transaction=False)
    pipe.delete(instance_key(instance_id))
    pipe.zrem(index_key(), instance_id)
    pipe.execute()


def instances_list() -> list[dict[str, Any]]:
    """Live instances' records (heartbeat within the TTL), web servers first, then by id."""
    now = time.time()
    client = redis_client()
    if client is None:
        with _local_lock:
            for key in [k for k, (expires, _) in _local_instances.items() if expires <= now]:
                del _local_instances[key]
            records = [record for _, record in _local_instances.values()]
    else:
        ids = [i.decode() if isinstance(i, bytes) else i for i in client.zrange(index_key(), 0, -1)]
        records = []
        if ids:
            raw = client.mget([instance_key(i) for i in ids])
            gone = [i for i, value in zip(ids, raw) if value is None]
            records = [json.loads(value) for value in raw if value is not None]
            if gone:
                # A killed instance left its id behind; its record expired with the TTL.
                client.zremrangebyscore(index_key(), 0, now - 2 * ttl_seconds())
    for record in records:
        record["age_seconds"] = round(now - float(record.get("heartbeat", now)), 1)
    return sorted(records, key=lambda r: (r.get("kind") != "web", str(r.get("id"))))


# --- journal ---------------------------------------------------------------------------------
def _journal_field(event: dict[str, Any]) -> str:
    from .events import event_key

    return f"{event['type']}|{event_key(event)}"


def journal_record(event: dict[str, Any]) -> bool:
    """Remember `event` as the newest of its (type, key). Never raises: the journal is a safety net."""
    if event["type"] not in JOURNALED_TYPES:
        return False
    field, body = _journal_field(event), json.dumps(event)
    version = "" if event["version"] is None else str(event["version"])
    client = redis_client()
    try:
        if client is None:
            with _local_lock:
                current = _local_journal.get(field)
                if (current is not None and event["version"] is not None and current.get("version") is not None
                        and current["version"] >= event["version"]):
                    return False
                _local_journal[field] = json.loads(body)
            return True
        return bool(client.eval(_JOURNAL_SCRIPT, 1, journal_key(), field, body, version,
                                int(settings.CLUSTER_JOURNAL_SECONDS)))
    except Exception:
        logger.warning("cluster journal write failed", extra={"event_type": event["type"]}, exc_info=True)
        return False


def journal_entries() -> list[dict[str, Any]]:
    """The journal's envelopes younger than CLUSTER_JOURNAL_SECONDS, oldest first; older ones are pruned."""
    horizon = time.time() - settings.CLUSTER_JOURNAL_SECONDS
    client = redis_client()
    if client is None:
        with _local_lock:
            for field in [f for f, e in _local_journal.items() if e.get("ts", 0) < horizon]:
                del _local_journal[field]
            entries = [dict(e) for e in _local_journal.values()]
    else:
        raw = client.hgetall(journal_key())
        entries, expired = [], []
        for field, body in raw.items():
            try:
                event = json.loads(body)
                ts = float(event["ts"])
            except (ValueError, TypeError, KeyError):
                expired.append(field)
                continue
            (expired if ts < horizon else entries).append(field if ts < horizon else event)
        if expired:
            client.hdel(journal_key(), *expired)
    return sorted(entries, key=lambda e: e.get("ts", 0))


def _reset_local_for_tests() -> None:
    with _local_lock:
        _local_instances.clear()
        _local_journal.clear()
