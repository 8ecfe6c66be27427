"""The cluster event bus in one process: envelope, idempotent dispatch, stale versions, publish after
commit, lag metric, and the API-key cache it keeps coherent."""
from __future__ import annotations

import random
import threading
import time

import pytest
from django.db import transaction

from apps.core import auth_cache, events
from apps.core.models import ApiKey
from apps.core.services import api_key_create, api_key_revoke
from tests.cluster.support import both_namespaces, isolated_namespace, redis_namespace  # noqa: F401  (fixtures)


@pytest.fixture(autouse=True)
def clean_bus(isolated_namespace):
    saved = {kind: list(handlers) for kind, handlers in events._handlers.items()}
    events._reset_for_tests()
    # Only the handlers a test registers (and core's own): other apps' handlers have their own tests.
    events._handlers.clear()
    events.register_handler("api_key_revoked", auth_cache.on_api_key_revoked)
    auth_cache.clear()
    yield
    events._handlers.clear()
    events._handlers.update(saved)
    events._reset_for_tests()
    auth_cache.clear()


@pytest.fixture
def calls():
    """Records the events a test handler saw; registered for knowledge_updated."""
    seen: list[dict] = []
    events.register_handler("knowledge_updated", seen.append)
    return seen


def counter(event_type: str, outcome: str) -> float:
    return events.EVENTS_TOTAL.labels(event_type, outcome)._value.get()


def knowledge(kb: int, version: int | None) -> dict:
    return events.make_event("knowledge_updated", {"knowledge_base": kb, "version": version}, version=version)


def test_envelope_has_the_documented_fields(settings):
    event = events.make_event("plugin_config_updated", {"plugin": "orders"}, version=3)
    assert set(event) == {"type", "id", "version", "origin", "ts", "payload"}
    assert event["origin"] == settings.INSTANCE_ID and event["version"] == 3
    assert abs(event["ts"] - time.time()) < 5
    assert events.make_event("session_updated", {"session_id": "s"})["id"] != event["id"]


@pytest.mark.parametrize("kwargs", [
    {"event_type": "nope", "payload": {}},
    {"event_type": "knowledge_updated", "payload": []},
    {"event_type": "knowledge_updated", "payload": {}, "version": -1},
    {"event_type": "knowledge_updated", "payload": {}, "version": True},
    {"event_type": "knowledge_updated", "payload": {}, "version": "3"},
])
def test_make_event_refuses_bad_input(kwargs):
    with pytest.raises(ValueError):
        events.make_event(kwargs.pop("event_type"), kwargs.pop("payload"), **kwargs)


def test_register_handler_refuses_unknown_types():
    with pytest.raises(ValueError):
        events.register_handler("knowledge_upated", lambda e: None)


def test_duplicate_ids_apply_once(calls):
    event = knowledge(1, 1)
    assert events.dispatch_outcome(event) == "applied"
    assert events.dispatch_outcome(dict(event)) == "duplicate"
    assert events.dispatch(event) is False
    assert [e["id"] for e in calls] == [event["id"]]


def test_stale_and_out_of_order_versions_are_ignored_per_key(calls):
    assert events.dispatch_outcome(knowledge(1, 5)) == "applied"
    assert events.dispatch_outcome(knowledge(1, 4)) == "stale"  # delayed / out of order
    assert events.dispatch_outcome(knowledge(1, 5)) == "stale"  # same version, another id
    assert events.dispatch_outcome(knowledge(2, 1)) == "applied"  # another knowledge base: its own versions
    assert events.dispatch_outcome(knowledge(1, 6)) == "applied"
    assert [(e["payload"]["knowledge_base"], e["version"]) for e in calls] == [(1, 5), (2, 1), (1, 6)]
    assert events.last_event()["version"] == 6 and events.last_events()["knowledge_updated"]["key"] == "1"
    assert events.held_version("knowledge_updated", "1") == 6
    assert events.held_versions("knowledge_updated") == {"1": 6, "2": 1}


def test_plugin_versions_are_one_global_counter():
    def plugin(name, version):
        return events.make_event("plugin_config_updated", {"plugin": name}, version=version)

    assert events.dispatch_outcome(plugin("orders", 5)) == "applied"
    assert events.dispatch_outcome(plugin("tickets", 4)) == "stale"  # older registry version, another plugin
    assert events.dispatch_outcome(plugin(None, 6)) == "applied"


def test_unversioned_events_are_deduplicated_by_id_only():
    seen = []
    events.register_handler("session_updated", seen.append)
    first = events.make_event("session_updated", {"session_id": "abc"})
    second = events.make_event("session_updated", {"session_id": "abc"})
    assert [events.dispatch_outcome(e) for e in (first, second, first)] == ["applied", "applied", "duplicate"]
    assert len(seen) == 2


def test_note_version_makes_older_events_stale(calls):
    events.note_version("knowledge_updated", "7", 3)  # e.g. loaded v3 from the database at start-up
    assert events.dispatch_outcome(knowledge(7, 2)) == "stale"
    assert events.dispatch_outcome(knowledge(7, 3)) == "stale"
    assert events.dispatch_outcome(knowledge(7, 4)) == "applied"
    events.note_version("knowledge_updated", "7", 1)  # never goes backwards
    assert events.held_version("knowledge_updated", "7") == 4


def test_a_failing_handler_leaves_the_event_retryable(calls):
    attempts = []

    def flaky(event):
        attempts.append(event["id"])
        if len(attempts) == 1:
            raise RuntimeError("index file not there yet")

    events.register_handler("knowledge_updated", flaky)
    event = knowledge(3, 2)
    before = counter("knowledge_updated", "failed")
    assert events.dispatch_outcome(event) == "failed"
    assert counter("knowledge_updated", "failed") == before + 1
    assert events.held_version("knowledge_updated", "3") is None
    assert events.dispatch_outcome(event) == "applied"  # the replay retries the same id
    assert attempts == [event["id"], event["id"]]
    assert events.last_event()["id"] == event["id"]


@pytest.mark.parametrize("message", [
    None, "text", [], {},
    {"type": "knowledge_updated"},
    {"type": "bogus", "id": "x", "version": 1, "origin": "o", "ts": 1.0, "payload": {}},
    {"type": "knowledge_updated", "id": "", "version": 1, "origin": "o", "ts": 1.0, "payload": {}},
    {"type": "knowledge_updated", "id": "x" * 65, "version": 1, "origin": "o", "ts": 1.0, "payload": {}},
    {"type": "knowledge_updated", "id": "x", "version": "1", "origin": "o", "ts": 1.0, "payload": {}},
    {"type": "knowledge_updated", "id": "x", "version": 1, "origin": "o", "ts": "now", "payload": {}},
    {"type": "knowledge_updated", "id": "x", "version": 1, "origin": "o", "ts": float("nan"), "payload": {}},
    {"type": "knowledge_updated", "id": "x", "version": 1, "origin": "o", "ts": 1.0, "payload": "kb=1"},
    {"type": "knowledge_updated", "id": "x", "version": 1, "origin": None, "ts": 1.0, "payload": {}},
])
def test_malformed_messages_are_counted_and_ignored(calls, message):
    before = counter("unknown", "invalid")
    assert events.dispatch_outcome(message) == "invalid"
    assert counter("unknown", "invalid") == before + 1
    assert calls == []


def test_remote_events_record_their_lag():
    histogram = events.EVENT_LAG.labels("plugin_config_updated")
    seconds_before, samples_before = histogram._sum.get(), sum(b.get() for b in histogram._buckets)
    event = events.make_event("plugin_config_updated", {"plugin": "tickets"}, version=1)
    event["ts"] = time.time() - 2.0  # published two seconds ago
    events.dispatch_outcome(event, remote=True)
    assert sum(b.get() for b in histogram._buckets) == samples_before + 1
    assert 1.9 < histogram._sum.get() - seconds_before < 10
    events.dispatch_outcome(events.make_event("plugin_config_updated", {"plugin": "x"}, version=1))
    assert sum(b.get() for b in histogram._buckets) == samples_before + 1  # local dispatch: no lag sample


def test_metrics_are_exported(client):
    events.dispatch_outcome(knowledge(9, 1))
    text = client.get("/metrics").content.decode()
    assert 'kotaemon_cluster_events_total{outcome="applied",type="knowledge_updated"}' in text
    assert "kotaemon_cluster_event_lag_seconds" in text


def test_concurrent_versions_of_one_key_never_apply_out_of_order():
    applied: list[int] = []

    def slow_handler(event):
        time.sleep(random.random() / 2000)
        applied.append(event["version"])

    events.register_handler("plugin_config_updated", slow_handler)
    versions = list(range(1, 201))
    random.Random(7).shuffle(versions)
    batches = [versions[i::4] for i in range(4)]

    def run(batch):
        for v in batch:
            events.dispatch_outcome(events.make_event("plugin_config_updated", {"plugin": "p"}, version=v))

    threads = [threading.Thread(target=run, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert applied == sorted(applied) and len(set(applied)) == len(applied)
    assert applied[-1] == 200 and events.held_version("plugin_config_updated") == 200


@pytest.mark.django_db(transaction=True)
def test_publish_on_commit_waits_for_the_commit_and_skips_rollbacks(calls):
    with transaction.atomic():
        sent = events.publish_on_commit("knowledge_updated", {"knowledge_base": 1, "version": 1}, version=1)
        assert calls == []  # not before the commit
    assert [e["id"] for e in calls] == [sent["id"]]
    with pytest.raises(RuntimeError):
        with transaction.atomic():
            events.publish_on_commit("knowledge_updated", {"knowledge_base": 1, "version": 2}, version=2)
            raise RuntimeError("rolled back")
    assert len(calls) == 1
    assert events.held_version("knowledge_updated", "1") == 1


def test_publish_records_the_journal_entry(calls, both_namespaces):
    from apps.core import registry

    events.publish(knowledge(4, 2))
    events.publish(knowledge(4, 1))  # an older version never replaces a newer entry
    entry = [e for e in registry.journal_entries() if e["payload"]["knowledge_base"] == 4]
    assert [e["version"] for e in entry] == [2]
    assert [e["version"] for e in calls] == [2]


def test_publish_survives_an_unreachable_channel_layer(calls, settings):
    from tests.helpers import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings.REDIS_TIMEOUT = 0.3
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {
        "hosts": [{"address": dead, "socket_timeout": 0.3, "socket_connect_timeout": 0.3}], "prefix": "dead"}}}
    settings.REDIS_URL = dead
    start = time.monotonic()
    events.publish(knowledge(5, 1))  # applied locally; the broadcast and the journal fail quietly
    assert time.monotonic() - start < 3
    assert [e["version"] for e in calls] == [1]


# --- the API-key cache kept coherent by api_key_revoked ---------------------------------------
@pytest.mark.django_db
def test_revoked_elsewhere_is_refused_here_once_the_event_arrives(user, settings):
    from apps.core.services import api_key_authenticate

    settings.API_KEY_CACHE_SECONDS = 300
    issued = api_key_create(user=user)
    assert api_key_authenticate(raw_key=issued.raw_key) is not None
    # Another instance revokes: the row changes, this process still holds a cached lookup ...
    ApiKey.objects.filter(pk=issued.api_key.pk).update(revoked_at=issued.api_key.created_at)
    assert api_key_authenticate(raw_key=issued.raw_key) is not None
    # ... until its api_key_revoked event arrives.
    revoked = events.make_event("api_key_revoked", {"key_id": issued.api_key.pk})
    revoked["origin"] = "another-instance"
    assert events.dispatch_outcome(revoked, remote=True) == "applied"
    assert api_key_authenticate(raw_key=issued.raw_key) is None


@pytest.mark.django_db
def test_revoking_drops_the_local_cache_at_once(user, settings, api_client):
    settings.API_KEY_CACHE_SECONDS = 300
    issued = api_key_create(user=user)
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {issued.raw_key}")
    assert api_client.get("/api/v1/me/").status_code == 200
    assert auth_cache.size() == 1
    api_key_revoke(user=user, key_id=issued.api_key.pk)  # inside the test transaction: no commit yet
    assert api_client.get("/api/v1/me/").status_code == 401


@pytest.mark.django_db
def test_cache_ttl_bounds_staleness_and_zero_disables(user, settings):
    from apps.core.services import api_key_authenticate

    settings.API_KEY_CACHE_SECONDS = 0.2
    issued = api_key_create(user=user)
    assert api_key_authenticate(raw_key=issued.raw_key) is not None
    ApiKey.objects.filter(pk=issued.api_key.pk).update(revoked_at=issued.api_key.created_at)
    time.sleep(0.25)
    assert api_key_authenticate(raw_key=issued.raw_key) is None
    settings.API_KEY_CACHE_SECONDS = 0
    other = api_key_create(user=user)
    api_key_authenticate(raw_key=other.raw_key)
    assert auth_cache.size() == 0


@pytest.mark.django_db
def test_expiry_is_rechecked_on_cached_keys(user, settings):
    from datetime import timedelta

    from django.utils import timezone

    from apps.core.services import api_key_authenticate

    settings.API_KEY_CACHE_SECONDS = 300
    issued = api_key_create(user=user, expires_at=timezone.now() + timedelta(seconds=60))
    key = api_key_authenticate(raw_key=issued.raw_key)
    key.expires_at = timezone.now() - timedelta(seconds=1)  # the cached object passes its expiry
    assert api_key_authenticate(raw_key=issued.raw_key) is None


@pytest.mark.django_db
def test_admin_revoke_action_publishes_for_every_key(user, staff_user, settings, client,
                                                     django_capture_on_commit_callbacks):
    staff_user.is_superuser = True
    staff_user.save()
    published = []
    events.register_handler("api_key_revoked", published.append)
    keys = [api_key_create(user=user) for _ in range(2)]
    client.force_login(staff_user)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/admin/core/apikey/",
                               {"action": "revoke", "_selected_action": [k.api_key.pk for k in keys]})
    assert response.status_code == 302
    assert sorted(e["payload"]["key_id"] for e in published) == sorted(k.api_key.pk for k in keys)
    assert ApiKey.objects.filter(revoked_at__isnull=True).count() == 0
