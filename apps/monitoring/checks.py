"""Readiness checks: each returns (ok, detail) and never raises or hangs past its timeout."""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Callable

from asgiref.sync import async_to_sync


def check_database() -> tuple[bool, str]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return True, connection.vendor


def check_cache() -> tuple[bool, str]:
    from django.core.cache import caches

    cache = caches["default"]

    key, value = f"readyz:{uuid.uuid4().hex}", uuid.uuid4().hex
    cache.set(key, value, 10)
    ok = cache.get(key) == value
    cache.delete(key)
    return ok, cache.__class__.__name__ if ok else "value written was not read back"


def check_channel_layer(timeout: float = 2.0) -> tuple[bool, str]:
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        return False, "no channel layer configured"

    async def roundtrip() -> bool:
        channel = await layer.new_channel("readyz.")
        await layer.send(channel, {"type": "readyz.ping", "nonce": uuid.uuid4().hex})
        message = await layer.receive(channel)
        return message.get("type") == "readyz.ping"

    async def bounded() -> bool:
        return await asyncio.wait_for(roundtrip(), timeout)

    return async_to_sync(bounded)(), layer.__class__.__name__


def check_indexes() -> tuple[bool, str]:
    """Not ready until this instance has loaded its indexes (the cluster runtime's warm-ups)."""
    from apps.core.cluster import readiness

    return readiness()


CHECKS: dict[str, Callable[[], tuple[bool, str]]] = {
    "database": check_database,
    "cache": check_cache,
    "channel_layer": check_channel_layer,
    "indexes": check_indexes,
}


def run_checks() -> dict[str, dict]:
    results = {}
    for name, check in CHECKS.items():
        start = time.perf_counter()
        try:
            ok, detail = check()
        except Exception as exc:  # a failing dependency is a result, not an error
            ok, detail = False, f"{exc.__class__.__name__}: {exc}"[:300]
        results[name] = {"ok": ok, "detail": detail, "ms": round((time.perf_counter() - start) * 1000, 1)}
    return results
