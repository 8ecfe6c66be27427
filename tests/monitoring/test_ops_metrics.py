"""Metrics owned by monitoring: Celery task outcomes, run time and queue wait; websocket connections,
frames and latency; audit events; the optional scrape token. Values are read back from /metrics."""
from __future__ import annotations

import json
import re
import subprocess
import time

import httpx
import pytest
from celery import shared_task
from channels.testing import WebsocketCommunicator

from tests.helpers import ROOT, VENV_BIN, free_port, server_env, wait_for_port

pytestmark = pytest.mark.django_db


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def scrape(client) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    return response.content.decode()


@shared_task(name="tests.monitoring.explode")
def explode():
    raise ValueError("boom")


def test_celery_outcomes_and_duration_are_counted(client):
    from apps.core.tasks import ping

    before = scrape(client)
    ping.apply(args=["x"])
    ping.apply(args=["y"])
    with pytest.raises(ValueError):
        explode.apply(throw=True)
    after = scrape(client)
    assert sample(after, "kotaemon_celery_tasks_total", task="core.ping", outcome="success") == \
        sample(before, "kotaemon_celery_tasks_total", task="core.ping", outcome="success") + 2
    assert sample(after, "kotaemon_celery_tasks_total", task="tests.monitoring.explode", outcome="failure") == \
        sample(before, "kotaemon_celery_tasks_total", task="tests.monitoring.explode", outcome="failure") + 1
    assert sample(after, "kotaemon_celery_task_duration_seconds_count", task="core.ping") == \
        sample(before, "kotaemon_celery_task_duration_seconds_count", task="core.ping") + 2


def test_task_logs_and_audit_rows_carry_the_task_context(user):
    """A task outside any request is named as the actor of what it changes."""
    from apps.monitoring.models import AuditEvent

    @shared_task(name="tests.monitoring.rename")
    def rename(user_id: int) -> None:
        from django.contrib.auth import get_user_model

        u = get_user_model().objects.get(pk=user_id)
        u.first_name = "Renamed"
        u.save()

    rename.apply(args=[user.pk])
    event = AuditEvent.objects.filter(model_label="auth.User", action="update").get()
    assert (event.actor_label, event.source) == ("task:tests.monitoring.rename", "task")
    assert event.request_id.startswith("task-")


def test_the_requester_is_carried_into_the_task_audit_rows(rf, user, other_user):
    """Publishing inside a request stamps the actor; the worker-side prerun names them on the changes."""
    from apps.core.logging import current_request_var
    from apps.monitoring import celery_signals
    from apps.monitoring.models import AuditEvent

    @shared_task(name="tests.monitoring.touch")
    def touch(user_id: int) -> None:
        from django.contrib.auth import get_user_model

        target = get_user_model().objects.get(pk=user_id)
        target.last_name = "Touched"
        target.save()

    request = rf.post("/admin/auth/user/")
    request.user = user
    headers: dict = {}
    token = current_request_var.set(request)
    try:
        celery_signals._on_before_publish(sender="tests.monitoring.touch", headers=headers)
    finally:
        current_request_var.reset(token)
    assert headers[celery_signals.ACTOR] == "alice" and headers[celery_signals.PUBLISHED_AT] > 0
    # What a worker does with that message: the headers become the task's request attributes.
    touch.push_request(id="t-1", **headers)
    try:
        celery_signals._on_prerun(sender=touch, task_id="t-1", task=touch)
        touch.run(other_user.pk)
        celery_signals._on_postrun(sender=touch, task_id="t-1", task=touch, state="SUCCESS")
    finally:
        touch.pop_request()
    event = AuditEvent.objects.get(model_label="auth.User", action="update", object_id=str(other_user.pk))
    assert (event.actor_label, event.source) == ("alice via task:tests.monitoring.touch", "task")


def headers():
    return [(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1")]


def ws_app():
    from channels.auth import AuthMiddlewareStack
    from channels.routing import URLRouter

    from apps.monitoring.websocket import WebsocketMetricsMiddleware
    from kotaemon_site.routing import websocket_urlpatterns

    return WebsocketMetricsMiddleware(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))


@pytest.mark.django_db(transaction=True)
async def test_websocket_connections_frames_and_latency(user, client):
    from apps.monitoring.metrics import render

    async def get(_client) -> str:
        # The exposition /metrics serves, rendered here: a test-client request from the async test would
        # run in an executor thread whose database connection outlives the test and blocks its flush.
        return render().decode()

    before = await get(client)
    comm = WebsocketCommunicator(ws_app(), "/ws/echo/", headers=headers())
    comm.scope["user"] = user
    connected, _ = await comm.connect()
    assert connected
    during = await get(client)
    assert sample(during, "kotaemon_websocket_connections_active", route="/ws/echo/") == \
        sample(before, "kotaemon_websocket_connections_active", route="/ws/echo/") + 1
    for i in range(3):
        await comm.send_to(text_data=json.dumps({"n": i}))
        assert json.loads(await comm.receive_from())["payload"] == {"n": i}
    await comm.disconnect()
    anonymous = WebsocketCommunicator(ws_app(), "/ws/echo/", headers=headers())
    connected, code = await anonymous.connect()
    assert not connected and code == 4401
    after = await get(client)

    def moved(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("kotaemon_websocket_connections_total", route="/ws/echo/", outcome="accepted") == 1
    assert moved("kotaemon_websocket_connections_total", route="/ws/echo/", outcome="rejected") == 1
    assert moved("kotaemon_websocket_messages_total", route="/ws/echo/") == 3
    assert moved("kotaemon_websocket_message_duration_seconds_count", route="/ws/echo/") == 3
    assert moved("kotaemon_websocket_connection_duration_seconds_count", route="/ws/echo/") == 1
    assert moved("kotaemon_websocket_connections_active", route="/ws/echo/") == 0


def test_websocket_route_label_is_the_pattern_not_the_path():
    from django.urls import path

    from apps.monitoring.websocket import websocket_route

    patterns = [path("ws/chat/<str:session_id>/", lambda: None), path("ws/echo/", lambda: None)]
    assert websocket_route("/ws/chat/abc123/", patterns) == "/ws/chat/<str:session_id>/"
    assert websocket_route("/ws/echo/", patterns) == "/ws/echo/"
    assert websocket_route("/ws/nope/", patterns) == "unmatched"


def test_audit_events_are_counted(client, user):
    before = sample(scrape(client), "kotaemon_audit_events_total", model="auth.User", action="update")
    user.first_name = "Z"
    user.save()
    assert sample(scrape(client), "kotaemon_audit_events_total", model="auth.User", action="update") == before + 1


def test_metrics_token_is_required_when_configured(client, settings):
    settings.METRICS_TOKEN = "scrape-" + "t" * 24
    denied = client.get("/metrics")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "metrics_token_required"
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    ok = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {settings.METRICS_TOKEN}")
    assert ok.status_code == 200 and b"kotaemon_http_requests_total" in ok.content


def test_instance_is_labelled(client, settings):
    assert sample(scrape(client), "kotaemon_instance_info", instance_id=settings.INSTANCE_ID) == 1


def test_chat_retrieval_outcomes_are_counted(client, user):
    from apps.conversations.services import chat_turn
    from apps.conversations.session_store import session_store_reset

    session_store_reset()
    before = scrape(client)
    chat_turn(user=user, session_id=None, message="Is there anything on the moons of Neptune?")
    after = scrape(client)
    assert sample(after, "kotaemon_chat_retrievals_total", result="empty") == \
        sample(before, "kotaemon_chat_retrievals_total", result="empty") + 1
    assert sample(after, "kotaemon_llm_calls_total", generator="extractive", outcome="ok") == \
        sample(before, "kotaemon_llm_calls_total", generator="extractive", outcome="ok") + 1
    session_store_reset()


def test_index_state_and_heartbeat_are_exported(client, user, settings):
    import time as _time

    from apps.core import registry
    from apps.knowledge.models import IndexVersion, KnowledgeBase
    from apps.monitoring.collectors import reset_cache

    kb = KnowledgeBase.objects.create(slug="policies", name="Policies")
    IndexVersion.objects.create(knowledge_base=kb, version=3, status="active", chunk_count=42)
    KnowledgeBase.objects.create(slug="empty-kb", name="Nothing yet")
    reset_cache()
    registry.heartbeat({"id": settings.INSTANCE_ID, "kind": "web"})
    try:
        text = scrape(client)
    finally:
        registry.deregister(settings.INSTANCE_ID)
    assert sample(text, "kotaemon_index_active_version", kb="policies") == 3
    assert sample(text, "kotaemon_index_size_chunks", kb="policies") == 42
    assert 'kotaemon_index_active_version{kb="empty-kb"} 0.0' in text
    assert abs(sample(text, "kotaemon_instance_heartbeat_timestamp") - _time.time()) < 30
    reset_cache()
    assert sample(scrape(client), "kotaemon_instance_heartbeat_timestamp") == 0  # deregistered: no heartbeat


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_real_worker_reports_queue_wait_outcomes_and_request_id(redis_url, tmp_path):
    """A real worker (solo pool) serves its metrics; a task published with a request id waits in the
    real Redis queue, and the worker's log lines for it carry that request id."""
    from celery import Celery

    from urllib.parse import urlsplit, urlunsplit

    port = free_port()
    queue = f"test-metrics-{port}"
    # A database of its own for the broker: tests running beside this one clear the cache database,
    # and with it any message queued there.
    broker = urlunsplit(urlsplit(redis_url)._replace(path="/13"))
    env = server_env(REDIS_URL=redis_url, CELERY_BROKER_URL=broker, CELERY_RESULT_BACKEND=broker,
                     WORKER_METRICS_PORT=str(port), WORKER_METRICS_ADDR="127.0.0.1", LOG_LEVEL="INFO")
    client = Celery(broker=broker, backend=broker, set_as_current=False)  # the platform app stays current
    # Published before the worker starts: it waits in the queue for at least the worker's start-up.
    published = time.time()
    result = client.send_task("core.ping", args=["queued"], queue=queue,
                              headers={"kotaemon_published_at": published, "kotaemon_request_id": "req-e2e-42"})
    worker = subprocess.Popen(
        [str(VENV_BIN / "celery"), "-q", "-A", "kotaemon_site", "worker", "--pool=solo", "-Q", queue, "-l", "info",
         "--without-heartbeat", "--without-gossip", "--without-mingle"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    value, text = None, ""
    try:
        value = result.get(timeout=90, propagate=False)
        waited = time.time() - published
        wait_for_port(port, timeout=30, proc=worker)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except Exception as exc:
        value = exc
    finally:
        worker.terminate()
        output = worker.communicate(timeout=30)[0].decode(errors="replace")
    (tmp_path / "worker.log").write_text(output)
    assert isinstance(value, dict) and value["value"] == "queued", (value, str(tmp_path / "worker.log"))
    assert sample(text, "kotaemon_celery_tasks_total", task="core.ping", outcome="success") == 1, output
    assert sample(text, "kotaemon_celery_queue_wait_seconds_count", task="core.ping") == 1
    wait_sum = sample(text, "kotaemon_celery_queue_wait_seconds_sum", task="core.ping")
    assert 0.2 < wait_sum <= waited + 1
    # Celery's SIGTERM handler writes its one farewell line straight to the terminal, bypassing logging.
    lines = [json.loads(line) for line in output.splitlines()
             if line.strip() and not line.startswith("worker: Warm shutdown")]
    assert all({"request_id", "session_id", "instance_id"} <= set(line) for line in lines), output
    assert any(line["request_id"] == "req-e2e-42" and "core.ping" in line["message"] for line in lines), output
