"""Shared pieces of the cluster tests: an isolated Redis namespace per test, and process helpers."""
from __future__ import annotations

import copy
import os
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest


def side_redis_url(url: str) -> str:
    """The same Redis server, another database (KOTAEMON_CLUSTER_TEST_REDIS_DB, default 13).

    Every test's autouse cache.clear() is a FLUSHDB of the cache's database (django-redis), which would
    wipe a running cluster's registry, journal, channel groups, sessions and Celery queue between two
    test functions, or under another developer's concurrent run. Keys are still prefixed per test."""
    parts = urlsplit(url)
    db = os.environ.get("KOTAEMON_CLUSTER_TEST_REDIS_DB", "13")
    return urlunsplit(parts._replace(path=f"/{db}"))


def namespace_settings(settings, redis_url: str | None) -> str:
    """Give this test its own key prefix (registry, journal, channel layer): other test runs share the
    Redis database, and their servers must not hear this test's events (nor this test theirs)."""
    prefix = f"kt{uuid.uuid4().hex[:12]}"
    settings.CACHE_KEY_PREFIX = prefix
    redis_url = side_redis_url(redis_url) if redis_url else redis_url
    if redis_url:
        settings.REDIS_URL = redis_url
        settings.CHANNEL_LAYERS = {"default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [{"address": redis_url, "socket_timeout": 15}], "prefix": f"{prefix}:asgi",
                       "capacity": 1000, "expiry": 60},
        }}
    else:
        settings.REDIS_URL = ""
        settings.CHANNEL_LAYERS = copy.deepcopy({"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}})
    return prefix


def delete_namespace(redis_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def redis_namespace(settings, redis_url):
    """Registry, journal and channel layer on the real Redis, under a prefix only this test uses."""
    prefix = namespace_settings(settings, redis_url)
    used = settings.REDIS_URL
    yield prefix
    delete_namespace(used, prefix)


@pytest.fixture
def local_namespace(settings):
    """The embedded default: no Redis, process-local registry and journal."""
    from apps.core import registry

    registry._reset_local_for_tests()
    yield namespace_settings(settings, None)
    registry._reset_local_for_tests()


@pytest.fixture
def isolated_namespace(settings):
    """Redis when the run has REDIS_URL (production paths), else the local stand-in; isolated either way."""
    from apps.core import registry

    url = settings.REDIS_URL
    registry._reset_local_for_tests()
    prefix = namespace_settings(settings, url or None)
    used = settings.REDIS_URL  # captured now: a test may point settings at another (or a dead) Redis
    yield prefix
    if used:
        delete_namespace(used, prefix)
    registry._reset_local_for_tests()


@pytest.fixture(params=["local", "redis"])
def both_namespaces(request, settings):
    """Each test runs once on the process-local stand-in and once on the real Redis."""
    from apps.core import registry

    registry._reset_local_for_tests()
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = namespace_settings(settings, url)
        used = settings.REDIS_URL
        yield prefix
        delete_namespace(used, prefix)
    else:
        yield namespace_settings(settings, None)
    registry._reset_local_for_tests()
