"""Session store: both implementations, and the Redis one against a real Redis."""
from __future__ import annotations

import json
import threading
import time
import uuid
import zlib

import pytest
import redis

from apps.conversations.session_store import Codec, MemorySessionStore, RedisSessionStore, on_session_updated


def make_codec(compress=4096, max_bytes=256 * 1024):
    return Codec(compress_bytes=compress, max_bytes=max_bytes)


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def prefix(redis_client):
    """A private key space on the shared Redis; "flushing" it never touches other tests' keys."""
    p = f"test-conv-{uuid.uuid4().hex[:10]}"
    yield p
    for key in redis_client.scan_iter(f"{p}:*"):
        redis_client.delete(key)


def redis_store(client, prefix, *, ttl=3600, codec=None, local=128, local_age=30.0):
    return RedisSessionStore(client=client, ttl_seconds=ttl, codec=codec or make_codec(), key_prefix=prefix,
                             local_cache_size=local, local_max_age=local_age, publish_events=False)


@pytest.fixture(params=["memory", "redis"])
def store(request, redis_client, prefix):
    if request.param == "memory":
        return MemorySessionStore(ttl_seconds=3600, codec=make_codec())
    return redis_store(redis_client, prefix)


def append_turn(text):
    def fn(current):
        current = current or {"turns": []}
        current["turns"].append({"role": "user", "content": text})
        return current
    return fn


def test_get_set_delete_and_update(store):
    assert store.get("s-00000001") is None
    first = store.set("s-00000001", {"turns": [{"role": "user", "content": "hi"}]})
    assert store.get("s-00000001").data == {"turns": [{"role": "user", "content": "hi"}]}
    second = store.update("s-00000001", append_turn("again"))
    assert second.version > first.version
    assert [t["content"] for t in store.get("s-00000001").data["turns"]] == ["hi", "again"]
    # None from the updater means "no change": same version.
    assert store.update("s-00000001", lambda cur: None).version == second.version
    store.delete("s-00000001")
    assert store.get("s-00000001") is None


def test_returned_state_is_a_copy(store):
    store.set("s-copy0001", {"turns": []})
    got = store.get("s-copy0001")
    got.data["turns"].append("mutated")
    assert store.get("s-copy0001").data == {"turns": []}


def test_concurrent_threads_never_lose_a_turn(store):
    n_threads, per_thread = 8, 25

    def worker(i):
        for j in range(per_thread):
            store.update("s-hot00001", append_turn(f"{i}-{j}"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    turns = [t["content"] for t in store.get("s-hot00001").data["turns"]]
    assert len(turns) == n_threads * per_thread
    assert len(set(turns)) == n_threads * per_thread


def test_two_redis_instances_appending_at_once_never_lose_a_turn(redis_url, prefix):
    # Separate clients, pools and local caches: two instances of the application.
    a = redis_store(redis.Redis.from_url(redis_url), prefix)
    b = redis_store(redis.Redis.from_url(redis_url), prefix)
    a.get("s-shared01"), b.get("s-shared01")  # both warm their local caches
    barrier = threading.Barrier(2)

    def worker(store, name):
        barrier.wait()
        for j in range(40):
            store.update("s-shared01", append_turn(f"{name}{j}"))

    threads = [threading.Thread(target=worker, args=(a, "a")), threading.Thread(target=worker, args=(b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for store in (a, b):
        store.local.clear()
        assert len(store.get("s-shared01").data["turns"]) == 80


def test_stale_local_copy_cannot_overwrite_a_newer_state(redis_client, prefix):
    a = redis_store(redis_client, prefix)
    b = redis_store(redis_client, prefix)
    a.set("s-stale001", {"turns": []})
    assert b.get("s-stale001") is not None  # b caches version 1
    a.update("s-stale001", append_turn("from a"))  # b misses the invalidation event
    b.update("s-stale001", append_turn("from b"))  # CAS fails on b's stale version, then retries
    a.local.clear()
    assert [t["content"] for t in a.get("s-stale001").data["turns"]] == ["from a", "from b"]


def test_versions_grow_across_expiry(redis_client, prefix):
    store = redis_store(redis_client, prefix, ttl=1)
    v1 = store.set("s-expire01", {"turns": ["old"]}).version
    redis_client.delete(f"{prefix}:s-expire01")  # as if it had expired
    store.local.clear()
    v2 = store.set("s-expire01", {"turns": ["new"]}).version
    assert v2 > v1


def test_ttl_is_set_and_refreshed_on_use(redis_client, prefix):
    store = redis_store(redis_client, prefix, ttl=100, local=0)
    store.set("s-ttl00001", {"turns": []})
    key = f"{prefix}:s-ttl00001"
    assert 95_000 < redis_client.pttl(key) <= 100_000
    redis_client.pexpire(key, 5_000)
    store.get("s-ttl00001")
    assert redis_client.pttl(key) > 95_000  # the read refreshed it


def test_expired_state_is_gone(redis_client, prefix):
    store = redis_store(redis_client, prefix, ttl=1, local=0)
    store.set("s-ttlgone1", {"turns": []})
    time.sleep(1.2)
    assert store.get("s-ttlgone1") is None


def test_memory_store_expires_and_refreshes():
    store = MemorySessionStore(ttl_seconds=1, codec=make_codec())
    store.set("s-memttl01", {"a": 1})
    time.sleep(0.6)
    assert store.get("s-memttl01") is not None  # use refreshes the TTL
    time.sleep(0.6)
    assert store.get("s-memttl01") is not None
    time.sleep(1.1)
    assert store.get("s-memttl01") is None


def test_large_state_is_compressed_in_redis(redis_client, prefix):
    store = redis_store(redis_client, prefix, codec=make_codec(compress=1024))
    turns = [{"role": "user", "content": f"question number {i} about the refund policy " * 5} for i in range(40)]
    store.set("s-big00001", {"turns": turns})
    raw = redis_client.hget(f"{prefix}:s-big00001", "d")
    plain = json.dumps({"turns": turns}).encode()
    assert raw[:1] == b"z" and len(raw) < len(plain) / 3
    assert json.loads(zlib.decompress(raw[1:]))["turns"] == turns
    store.local.clear()
    assert store.get("s-big00001").data["turns"] == turns
    store.set("s-small001", {"turns": []})
    assert redis_client.hget(f"{prefix}:s-small001", "d")[:1] == b"j"


def test_state_over_the_cap_is_trimmed_from_the_oldest_turns(store):
    import os

    store.codec = make_codec(compress=10**9, max_bytes=2000)
    # Incompressible-ish content so the cap applies to real sizes.
    turns = [{"role": "user", "content": f"turn {i} " + os.urandom(60).hex()} for i in range(30)]
    saved = store.set("s-trim0001", {"turns": turns, "last_query": "q"})
    kept = saved.data["turns"]
    assert 0 < len(kept) < 30
    assert kept == turns[-len(kept):]  # the newest turns survive, in order
    assert saved.data["trimmed_turns"] == 30 - len(kept)
    assert store.get("s-trim0001").data["turns"] == kept
    # Never rejected, even when one turn alone is larger than the cap.
    huge = store.set("s-trim0002", {"turns": [{"role": "user", "content": "x" * 10_000 + "END"}]})
    assert huge.data["turns"][0]["content"].endswith("END")
    assert len(json.dumps(huge.data)) < 2000


def test_sensitive_values_are_masked_in_redis(redis_client, prefix, settings):
    settings.SENSITIVE_PATTERNS = [r"\bEMP-\d{5}\b"]
    store = redis_store(redis_client, prefix)
    text = ("I am jane.roe@example.org, call me on +44 20 7946 0958, card 4111 1111 1111 1111, "
            "SSN 123-45-6789, employee EMP-12345, order 12345 arrived on 2024-03-01.")
    store.set("s-mask0001", {"turns": [{"role": "user", "content": text}]})
    raw = redis_client.hget(f"{prefix}:s-mask0001", "d")
    stored = Codec.decode(raw)["turns"][0]["content"]
    for secret in ("jane.roe@example.org", "7946", "4111", "123-45-6789", "EMP-12345"):
        assert secret not in stored and secret.encode() not in raw
    for marker in ("[email]", "[phone]", "[card]", "[id]", "[redacted]"):
        assert marker in stored
    assert "order 12345 arrived on 2024-03-01" in stored  # ordinary numbers and dates survive


def test_local_cache_serves_reads_and_is_invalidated_by_the_event(redis_client, prefix):
    a = redis_store(redis_client, prefix)
    b = redis_store(redis_client, prefix)
    a.set("s-local001", {"turns": ["one"]})
    assert b.get("s-local001").data == {"turns": ["one"]}
    # Another instance writes behind b's back: b's local copy is (correctly) still served...
    newer = a.update("s-local001", lambda cur: {"turns": cur["turns"] + ["two"]})
    assert b.get("s-local001").data == {"turns": ["one"]}
    # ...until the session_updated event reaches b.
    b.invalidate_local("s-local001", version=newer.version)
    assert b.get("s-local001").data == {"turns": ["one", "two"]}
    # An event about an older version than b holds changes nothing (idempotent, out of order).
    b.invalidate_local("s-local001", version=newer.version - 1)
    assert len(b.local) == 1


def test_session_updated_handler_drops_the_configured_stores_copy(settings, redis_url, prefix):
    from apps.conversations import session_store as module
    from apps.core.events import dispatch, make_event

    store = redis_store(redis.Redis.from_url(redis_url), prefix)
    module._store = store
    try:
        state = store.set("s-event001", {"turns": []})
        event = make_event("session_updated", {"session_id": "s-event001"}, version=state.version + 1)
        assert dispatch(event)  # the handler registered in ConversationsConfig.ready()
        assert store.local.get("s-event001") is None
        # Our own write's event (same version) keeps the fresh local copy.
        state = store.set("s-event001", {"turns": ["x"]})
        on_session_updated(make_event("session_updated", {"session_id": "s-event001"}, version=state.version))
        assert store.local.get("s-event001") is not None
    finally:
        module.session_store_reset()


def test_local_copy_is_revalidated_after_its_max_age(redis_client, prefix):
    a = redis_store(redis_client, prefix)
    b = redis_store(redis_client, prefix, local_age=0.2)
    a.set("s-age00001", {"n": 1})
    assert b.get("s-age00001").data == {"n": 1}
    a.set("s-age00001", {"n": 2})
    time.sleep(0.3)
    assert b.get("s-age00001").data == {"n": 2}  # a lost event heals by itself


def test_unreadable_state_is_treated_as_missing_and_replaced(redis_client, prefix):
    store = redis_store(redis_client, prefix, local=0)
    redis_client.hset(f"{prefix}:s-corrupt1", mapping={"v": "5", "d": b"zNOT-ZLIB"})
    assert store.get("s-corrupt1") is None
    state = store.update("s-corrupt1", lambda cur: {"rebuilt": cur is None})
    assert state.data == {"rebuilt": True} and state.version > 5


def test_redis_store_from_settings_uses_django_redis_pool(settings, redis_url):
    from apps.conversations.session_store import build_store

    if not settings.REDIS_URL:
        pytest.skip("the django-redis pool exists only when REDIS_URL is set (the store itself is tested above)")
    store = build_store("redis")
    assert isinstance(store, RedisSessionStore)
    store.set("s-pool0001", {"ok": True})
    assert store.get("s-pool0001").data == {"ok": True}
    store.delete("s-pool0001")


def test_unknown_backend_is_a_clear_configuration_error():
    from django.core.exceptions import ImproperlyConfigured

    from apps.conversations.session_store import build_store

    with pytest.raises(ImproperlyConfigured, match="SESSION_STORE_BACKEND"):
        build_store("memcached")


@pytest.mark.django_db
def test_state_of_another_conversation_under_the_same_id_is_not_used(user):
    """A session id reused after a delete (or pks handed out again after a restore) rebuilds from the database."""
    from apps.conversations.models import Conversation, Message
    from apps.conversations.selectors import session_state_get
    from apps.conversations.session_store import get_session_store, session_store_reset

    session_store_reset()
    conversation = Conversation.objects.create(session_id="s-reused01", owner=user)
    Message.objects.create(conversation=conversation, role="user", content="call me at +44 20 7946 0958")
    get_session_store().set("s-reused01", {"conversation_id": conversation.pk, "conversation_key": "old",
                                           "turns": [{"role": "user", "content": "someone else's turn"}]})
    state = session_state_get(conversation=conversation).data
    assert [t["content"] for t in state["turns"]] == ["call me at [phone]"]
    # The identifier survives masking, so the next read is a hit, not another rebuild.
    assert session_state_get(conversation=conversation).version == get_session_store().get("s-reused01").version
    assert get_session_store().get("s-reused01").data["conversation_key"] == state["conversation_key"]
    session_store_reset()
