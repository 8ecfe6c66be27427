"""Issue 10 finding 10: a task that OOM-kills its worker was redelivered forever; /accounts/login/ had no
rate limit; /metrics was open by default under production settings."""
from __future__ import annotations

import subprocess
import time

import pytest

from tests.helpers import ROOT, VENV_BIN, server_env


# --- capped redelivery ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_poison_task_is_parked_after_the_delivery_cap(redis_url, client, django_user_model):
    from celery import Celery

    from apps.core.models import ParkedTask

    env = server_env(REDIS_URL=redis_url, CELERY_BROKER_URL=redis_url, CELERY_RESULT_BACKEND=redis_url,
                     CELERY_MAX_DELIVERIES="2", CLUSTER_WORKER_RUNTIME="0")
    queue = f"test-poison-{time.monotonic_ns()}"
    worker = subprocess.Popen(
        [str(VENV_BIN / "celery"), "-A", "kotaemon_site", "worker", "--pool=prefork", "--concurrency=1", "-Q", queue,
         "-l", "warning", "--include", "tests.core.poison_tasks", "--without-heartbeat", "--without-gossip",
         "--without-mingle"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    sender = Celery(broker=redis_url, backend=redis_url, set_as_current=False)  # the platform app stays current
    try:
        result = sender.send_task("tests.poison", args=["boom"], queue=queue)
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not ParkedTask.objects.filter(task_id=result.id).exists():
            assert worker.poll() is None, "the worker's main process died"
            time.sleep(0.5)
        parked = ParkedTask.objects.filter(task_id=result.id).first()
        assert parked is not None, "the poison task was never parked"
        assert parked.task_name == "tests.poison" and parked.args == ["boom"] and parked.deliveries == 2
        # Parked means gone from the queue: it is not delivered (and does not kill a worker) again.
        time.sleep(3)
        assert ParkedTask.objects.get(pk=parked.pk).deliveries == 2
        assert sender.connection().default_channel.client.llen(queue) == 0
    finally:
        worker.terminate()
        output = worker.communicate(timeout=30)[0].decode(errors="replace")
    assert "WorkerLostError" in output or "SIGKILL" in output or "Signal 9" in output, output[-2000:]

    # Visible in the admin.
    root = django_user_model.objects.create_superuser("root", "root@example.com", "pw-root-123")
    client.force_login(root)
    page = client.get("/admin/core/parkedtask/")
    assert page.status_code == 200 and "tests.poison" in page.content.decode()


@pytest.mark.django_db
def test_the_cap_does_nothing_inline_and_forgets_finished_tasks(settings):
    from apps.core.tasks import delivery_count, ping

    from django.core.cache import cache

    from apps.core.tasks import _counter_key

    result = ping.apply(args=["x"], task_id="inline-task-id")  # run here, as eager mode does
    assert result.get()["value"] == "x" and cache.get(_counter_key("inline-task-id")) is None
    assert delivery_count("some-task-id") == 1 and delivery_count("some-task-id") == 2


# --- login rate limiting ---------------------------------------------------------------------------

@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/accounts/login/", "/admin/login/"])
def test_login_is_rate_limited_per_username_and_per_ip(client, user, settings, path):
    settings.LOGIN_FAILURES_PER_USERNAME = 3
    settings.LOGIN_FAILURES_PER_IP = 5
    for attempt in range(3):
        response = client.post(path, {"username": "alice", "password": f"wrong-{attempt}"})
        assert response.status_code == 200  # the form again, with Django's own error
    # The attack: keep guessing. Refused before the password is checked, even the right one.
    blocked = client.post(path, {"username": "alice", "password": "pw-alice-123"})
    assert blocked.status_code == 429 and int(blocked["Retry-After"]) > 0
    assert "Too many failed sign-in attempts" in blocked.content.decode()
    assert "_auth_user_id" not in client.session
    # Per IP too: other usernames from the same address run into the address limit.
    for name in ("bob1", "bob2"):
        client.post(path, {"username": name, "password": "x"})
    assert client.post(path, {"username": "carol", "password": "x"}).status_code == 429
    # Another address may still sign in as someone else.
    ok = client.post(path, {"username": "alice2", "password": "x"}, REMOTE_ADDR="10.9.8.7")
    assert ok.status_code == 200


@pytest.mark.django_db
def test_successful_login_clears_the_username_counter(client, user, settings):
    settings.LOGIN_FAILURES_PER_USERNAME = 3
    for _ in range(2):
        client.post("/accounts/login/", {"username": "alice", "password": "nope"})
    assert client.post("/accounts/login/", {"username": "alice", "password": "pw-alice-123"}).status_code == 302
    client.logout()
    for _ in range(2):
        assert client.post("/accounts/login/", {"username": "alice", "password": "nope"}).status_code == 200


# --- /metrics behind a token by default -------------------------------------------------------------

@pytest.mark.django_db
def test_metrics_denied_without_a_token_under_production_defaults(client, settings):
    settings.METRICS_TOKEN = ""
    settings.METRICS_PUBLIC = False  # what DEBUG off gives (probed below)
    denied = client.get("/metrics")
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "metrics_token_not_configured"
    settings.METRICS_TOKEN = "scrape-" + "t" * 24
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {settings.METRICS_TOKEN}").status_code == 200


@pytest.fixture
def worker_metrics(settings):
    """The Celery worker's metrics endpoint, started the way worker_init starts it."""
    from apps.monitoring.celery_signals import _on_worker_init
    from tests.helpers import free_port

    settings.WORKER_METRICS_PORT = free_port()
    settings.WORKER_METRICS_ADDR = "127.0.0.1"
    server = _on_worker_init()
    yield f"http://127.0.0.1:{settings.WORKER_METRICS_PORT}/metrics"
    server.shutdown()
    server.server_close()


@pytest.mark.django_db
def test_worker_metrics_endpoint_follows_the_same_token_rule(client, settings, worker_metrics):
    import httpx

    def both(**headers):
        web = client.get("/metrics", **{f"HTTP_{k.upper()}": v for k, v in headers.items()})
        worker = httpx.get(worker_metrics, headers=headers, timeout=10)
        return web, worker

    settings.METRICS_TOKEN = ""
    settings.METRICS_PUBLIC = False
    for response in both():
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "metrics_token_not_configured"
    settings.METRICS_TOKEN = "scrape-" + "w" * 24
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": settings.METRICS_TOKEN}):
        for response in both(**headers):
            assert response.status_code == 401 and response.headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
            assert response.json()["error"]["code"] == "metrics_token_required"
    web, worker = both(Authorization=f"Bearer {settings.METRICS_TOKEN}")
    assert web.status_code == worker.status_code == 200
    assert "kotaemon_http_requests_total" in worker.text and settings.METRICS_TOKEN not in worker.text
    settings.METRICS_TOKEN = ""
    settings.METRICS_PUBLIC = True   # development: open on both
    assert [r.status_code for r in both()] == [200, 200]


def test_production_settings_close_metrics_by_default():
    from tests.core.test_settings import probe_value

    assert probe_value({"SECRET_KEY": "s" * 64, "ALLOWED_HOSTS": "example.com"}, "METRICS_PUBLIC") is False
    assert probe_value({"SECRET_KEY": "s" * 64, "ALLOWED_HOSTS": "example.com"}, "ARCHIVE_SIGNING_KEY") == ""
