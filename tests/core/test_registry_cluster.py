"""Instance registry, event journal, the per-process cluster runtime (listener, heartbeat, reconcile,
warm-up), its ASGI lifespan, readiness, `manage.py cluster_status` and the admin page."""
from __future__ import annotations

import asyncio
import json
import time
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from apps.core import auth_cache, cluster, events, registry
from tests.cluster.support import both_namespaces, isolated_namespace, local_namespace, redis_namespace  # noqa: F401


def wait_until(predicate, timeout: float = 5.0, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture(autouse=True)
def clean_state():
    saved_handlers = {kind: list(handlers) for kind, handlers in events._handlers.items()}
    # Only the handlers a test registers (and core's own): other apps' handlers have their own tests.
    events._handlers.clear()
    events.register_handler("api_key_revoked", auth_cache.on_api_key_revoked)
    saved_warmups, saved_reconcilers = dict(cluster._warmups), dict(cluster._reconcilers)
    events._reset_for_tests()
    cluster._inline_warm.clear()
    yield
    cluster.stop()
    events._handlers.clear()
    events._handlers.update(saved_handlers)
    cluster._warmups.clear()
    cluster._warmups.update(saved_warmups)
    cluster._reconcilers.clear()
    cluster._reconcilers.update(saved_reconcilers)
    cluster._inline_warm.clear()
    events._reset_for_tests()


def record(instance_id: str, **extra) -> dict:
    return {"id": instance_id, "kind": "web", "host": "h", "port": 8000, "pid": 1, "started": time.time(),
            "ready": True, **extra}


# --- registry ---------------------------------------------------------------------------------
def test_heartbeat_list_and_deregister(both_namespaces):
    registry.heartbeat(record("b-web"))
    registry.heartbeat(record("a-worker", kind="worker"))
    registry.heartbeat(record("a-web", indexes={"1": 3}))
    listed = registry.instances_list()
    assert [r["id"] for r in listed] == ["a-web", "b-web", "a-worker"]  # web first, then by id
    assert listed[0]["indexes"] == {"1": 3} and listed[0]["age_seconds"] < 2
    registry.deregister("b-web")
    assert [r["id"] for r in registry.instances_list()] == ["a-web", "a-worker"]


def test_a_silent_instance_disappears_after_the_ttl(both_namespaces, settings):
    settings.CLUSTER_INSTANCE_TTL_SECONDS = 1
    registry.heartbeat(record("killed"))
    assert [r["id"] for r in registry.instances_list()] == ["killed"]
    time.sleep(1.15)
    assert registry.instances_list() == []


def test_journal_keeps_the_newest_version_per_key(both_namespaces):
    def event(kb, version):
        return events.make_event("knowledge_updated", {"knowledge_base": kb, "version": version}, version=version)

    assert registry.journal_record(event(1, 2)) is True
    assert registry.journal_record(event(1, 1)) is False  # delayed publisher: older, ignored
    assert registry.journal_record(event(1, 2)) is False
    assert registry.journal_record(event(2, 1)) is True
    assert registry.journal_record(event(1, 3)) is True
    assert sorted((e["payload"]["knowledge_base"], e["version"]) for e in registry.journal_entries()) == [(1, 3), (2, 1)]
    revoked = events.make_event("api_key_revoked", {"key_id": 5})
    assert registry.journal_record(revoked) is True
    assert registry.journal_record(events.make_event("session_updated", {"session_id": "s"})) is False  # not journaled
    assert {e["type"] for e in registry.journal_entries()} == {"knowledge_updated", "api_key_revoked"}


def test_journal_forgets_old_entries(both_namespaces, settings):
    old = events.make_event("plugin_config_updated", {"plugin": "orders"}, version=1)
    old["ts"] = time.time() - 7200
    registry.journal_record(old)
    settings.CLUSTER_JOURNAL_SECONDS = 3600
    assert registry.journal_entries() == []
    settings.CLUSTER_JOURNAL_SECONDS = 24 * 3600
    assert registry.journal_entries() == []  # pruned, not just hidden


def test_replay_applies_missed_entries_once(both_namespaces):
    seen = []
    events.register_handler("api_key_revoked", seen.append)
    events.register_handler("knowledge_updated", seen.append)
    revoked = events.make_event("api_key_revoked", {"key_id": 41})
    built = events.make_event("knowledge_updated", {"knowledge_base": 3, "version": 7}, version=7)
    just_now = events.make_event("knowledge_updated", {"knowledge_base": 4, "version": 1}, version=1)
    for event, age in ((revoked, 5), (built, 5), (just_now, 0)):
        event["ts"] -= age
        registry.journal_record(event)
    duplicates = events.stats()["duplicate"]
    assert cluster.replay_journal() == 2  # the fresh entry's broadcast is still on its way: left for later
    assert {e["id"] for e in seen} == {revoked["id"], built["id"]}
    assert cluster.replay_journal() == 0  # nothing is dispatched again, not even as a counted duplicate
    assert events.stats()["duplicate"] == duplicates and len(seen) == 2
    assert events.held_version("knowledge_updated", "3") == 7


# --- runtime ----------------------------------------------------------------------------------
def test_argv_port_parsing():
    assert cluster._argv_port(["uvicorn", "kotaemon_site.asgi:application", "--port", "8123"]) == 8123
    assert cluster._argv_port(["uvicorn", "x:y", "--port=81"]) == 81
    assert cluster._argv_port(["daphne", "-p", "9000", "x:y"]) == 9000
    assert cluster._argv_port(["gunicorn", "--bind", "0.0.0.0:8001"]) == 8001
    assert cluster._argv_port(["uvicorn", "x:y"]) is None


@pytest.mark.django_db(transaction=True)
def test_runtime_receives_heartbeats_and_heals_on_real_redis(redis_namespace, settings):
    """One runtime in this process against the real Redis; another instance is played by a separate
    channel-layer client and by direct journal writes."""
    from channels_redis.core import RedisChannelLayer

    settings.CLUSTER_HEARTBEAT_SECONDS = 0.2
    settings.CLUSTER_RECONCILE_SECONDS = 0.2
    received = []
    events.register_handler("plugin_config_updated", received.append)
    runtime = cluster.start(kind="web")
    wait_until(lambda: runtime.subscribed and runtime.ready)
    rows = wait_until(lambda: [r for r in registry.instances_list()
                               if r["id"] == settings.INSTANCE_ID and r["subscribed"] and r["ready"]], timeout=2)
    assert rows[0]["pid"] == runtime.pid and rows[0]["kind"] == "web"

    # A broadcast from another instance arrives through the listener.
    other = RedisChannelLayer(hosts=[settings.REDIS_URL], prefix=f"{redis_namespace}:asgi")
    event = events.make_event("plugin_config_updated", {"plugin": "orders"}, version=4)
    event["origin"] = "other-instance"
    asyncio.run(other.group_send(events.CLUSTER_GROUP, {"type": "cluster.event", "event": event}))
    wait_until(lambda: [e["id"] for e in received] == [event["id"]])
    # The same event again, and an older version, change nothing.
    stale = dict(event, id="older-one", version=3)
    asyncio.run(other.group_send(events.CLUSTER_GROUP, {"type": "cluster.event", "event": event}))
    asyncio.run(other.group_send(events.CLUSTER_GROUP, {"type": "cluster.event", "event": stale}))
    asyncio.run(other.group_send(events.CLUSTER_GROUP, {"type": "cluster.event", "event": {"junk": True}}))
    wait_until(lambda: events.stats()["duplicate"] >= 1 and events.stats()["stale"] >= 1
               and events.stats()["invalid"] >= 1)
    assert len(received) == 1

    # An event whose broadcast was lost: only the journal has it. The reconciler applies it.
    lost = events.make_event("plugin_config_updated", {"plugin": "orders"}, version=5)
    lost["origin"] = "other-instance"
    assert registry.journal_record(lost)
    wait_until(lambda: len(received) == 2)
    assert received[1]["id"] == lost["id"] and runtime.heals >= 1
    assert wait_until(lambda: [r for r in registry.instances_list()
                               if r["id"] == settings.INSTANCE_ID and (r["last_event"] or {}).get("version") == 5
                               and r["last_events"]["plugin_config_updated"]["id"] == lost["id"]])

    cluster.stop()
    assert [r for r in registry.instances_list() if r["id"] == settings.INSTANCE_ID] == []


@pytest.mark.django_db(transaction=True)
def test_warmup_gates_readiness_and_is_retried(isolated_namespace, settings, client):
    settings.CLUSTER_HEARTBEAT_SECONDS = 0.1
    settings.CLUSTER_RECONCILE_SECONDS = 0.1
    attempts = []

    def load_indexes():
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise RuntimeError("index v2 not on disk yet")

    cluster.register_warmup("indexes", load_indexes)
    runtime = cluster.start(kind="web")
    ok, detail = cluster.readiness()
    if not ok:
        assert "indexes" in detail
        response = client.get("/readyz")
        assert response.status_code == 503 and "indexes" in response.json()["failing"]
    wait_until(lambda: runtime.ready)
    assert len(attempts) == 3
    response = client.get("/readyz")
    assert response.json()["checks"]["indexes"]["ok"] is True


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", ["web", "worker"])
def test_a_reconciler_runs_only_in_the_kinds_it_names(isolated_namespace, settings, kind):
    """Chat-turn takeover is registered for web instances only: a Celery worker must not pick up answers."""
    settings.CLUSTER_HEARTBEAT_SECONDS = 0.1
    settings.CLUSTER_RECONCILE_SECONDS = 0.1
    ran = {"web-only": 0, "everywhere": 0}
    cluster.register_reconciler("web-only", lambda: ran.__setitem__("web-only", ran["web-only"] + 1), kinds=("web",))
    cluster.register_reconciler("everywhere", lambda: ran.__setitem__("everywhere", ran["everywhere"] + 1))
    runtime = cluster.start(kind=kind)
    wait_until(lambda: ran["everywhere"] >= 3)
    runtime.reconcile()
    assert (ran["web-only"] > 0) is (kind == "web")
    from apps.conversations.apps import _turns_reconcile

    from django.apps import apps as django_apps

    cluster._reconcilers.clear()
    django_apps.get_app_config("conversations").ready()  # idempotent; the fixture restores the registry
    assert cluster._reconcilers["chat_turn_takeover"] == (_turns_reconcile, ("web",))


@pytest.mark.django_db
def test_readiness_without_a_runtime_warms_up_inline(isolated_namespace, client):
    state = {"fail": True}

    def load_indexes():
        if state["fail"]:
            raise RuntimeError("index store unreachable")

    cluster.register_warmup("indexes", load_indexes)
    body = client.get("/readyz").json()
    assert body["checks"]["indexes"]["ok"] is False and "index store unreachable" in body["checks"]["indexes"]["detail"]
    state["fail"] = False
    assert client.get("/readyz").json()["checks"]["indexes"]["ok"] is True


@pytest.mark.django_db(transaction=True)
def test_lifespan_starts_and_stops_the_runtime(local_namespace, settings):
    settings.CLUSTER_HEARTBEAT_SECONDS = 0.1
    inner_scopes = []

    async def inner(scope, receive, send):
        inner_scopes.append(scope["type"])

    app = cluster.ClusterLifespan(inner)

    async def lifespan():
        queue: asyncio.Queue = asyncio.Queue()
        sent = []

        async def send(message):
            sent.append(message["type"])

        await queue.put({"type": "lifespan.startup"})
        task = asyncio.ensure_future(app({"type": "lifespan"}, queue.get, send))
        while not sent:
            await asyncio.sleep(0.01)
        started = cluster.current()
        await app({"type": "http", "server": ("127.0.0.1", 8765)}, None, None)
        await asyncio.sleep(0.3)
        listed = await asyncio.to_thread(registry.instances_list)
        await queue.put({"type": "lifespan.shutdown"})
        await task
        return sent, started, listed

    sent, started, listed = asyncio.run(lifespan())
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert started is not None and started.port == 8765 and inner_scopes == ["http"]
    assert [r["id"] for r in listed] == [settings.INSTANCE_ID] and listed[0]["port"] == 8765
    assert cluster.current() is None and registry.instances_list() == []


# --- operator views ---------------------------------------------------------------------------
def test_cluster_status_command(both_namespaces):
    registry.heartbeat(record("web-1", port=8001, indexes={"1": 4, "2": 1}, plugin_config_version=7,
                              last_event={"type": "knowledge_updated", "version": 4, "received": time.time()}))
    registry.heartbeat(record("worker-1", kind="worker", port=None, ready=False))
    out = StringIO()
    call_command("cluster_status", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["instance", "kind", "host", "port", "pid", "up_s", "ready", "sub", "indexes",
                                "plugins", "last_event", "beat_s"]
    assert lines[1].split()[:4] == ["web-1", "web", "h", "8001"]
    assert "1:v4,2:v1" in lines[1] and "knowledge_updated v4" in lines[1] and " 7 " in lines[1]
    assert lines[2].startswith("worker-1")
    out = StringIO()
    call_command("cluster_status", "--json", stdout=out)
    assert [r["id"] for r in json.loads(out.getvalue())] == ["web-1", "worker-1"]
    with pytest.raises(CommandError, match="only 1 of 2 web instances ready"):
        call_command("cluster_status", "--wait-ready", "2", "--timeout", "0.3", stdout=StringIO())


def test_cluster_status_with_no_instances(local_namespace):
    out = StringIO()
    call_command("cluster_status", stdout=out)
    assert out.getvalue().strip() == "No instance has reported a heartbeat."


def test_cluster_status_fails_clearly_when_redis_is_down(settings, local_namespace):
    from tests.helpers import free_port

    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    settings.REDIS_TIMEOUT = 0.3
    with pytest.raises(CommandError, match="registry could not be read"):
        call_command("cluster_status", stdout=StringIO())


@pytest.mark.django_db
def test_admin_cluster_page_is_staff_only(both_namespaces, client, user, staff_user, auditor):
    registry.heartbeat(record("web-admin-1", indexes={"3": 2}))
    assert client.get("/admin/cluster/").status_code == 302  # anonymous: to the login page
    client.force_login(user)
    assert client.get("/admin/cluster/").status_code == 302  # not staff
    client.force_login(staff_user)
    assert client.get("/admin/cluster/").status_code == 403  # staff without the auditor role
    assert "/admin/cluster/" not in client.get("/admin/").content.decode()
    client.force_login(auditor)
    page = client.get("/admin/cluster/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "web-admin-1" in html and "3: v2" in html and 'id="cluster-instances"' in html
    assert [r["id"] for r in client.get("/admin/cluster/?format=json").json()["instances"]] == ["web-admin-1"]
    assert "/admin/cluster/" in client.get("/admin/").content.decode()  # linked from the index


@pytest.mark.django_db
def test_admin_cluster_page_reports_an_unreadable_registry(settings, local_namespace, client, auditor):
    from tests.helpers import free_port

    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    settings.REDIS_TIMEOUT = 0.3
    client.force_login(auditor)
    page = client.get("/admin/cluster/")
    assert page.status_code == 200 and "could not be read" in page.content.decode()
    assert client.get("/admin/cluster/?format=json").status_code == 503
