"""/healthz, /readyz and /metrics, including with Redis down or unreachable."""
import subprocess

import httpx
import pytest

from tests.helpers import asgi_server, free_port, server_env, wait_for_port

pytestmark = pytest.mark.django_db(transaction=True)


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_all_checks_pass(client):
    response = client.get("/readyz")
    body = response.json()
    assert response.status_code == 200, body
    assert body["status"] == "ok" and body["failing"] == []
    # Other apps add their own checks (the cluster runtime adds "indexes"); these three are always there.
    assert {"database", "cache", "channel_layer"} <= set(body["checks"])
    assert all(check["ok"] for check in body["checks"].values())


def test_metrics_count_requests(client):
    client.get("/healthz")
    client.get("/healthz")
    text = client.get("/metrics").content.decode()
    line = next(l for l in text.splitlines()
                if l.startswith("kotaemon_http_requests_total{") and 'route="/healthz"' in l and 'status="200"' in l)
    before = float(line.rsplit(" ", 1)[1])
    client.get("/healthz")
    text = client.get("/metrics").content.decode()
    line = next(l for l in text.splitlines()
                if l.startswith("kotaemon_http_requests_total{") and 'route="/healthz"' in l and 'status="200"' in l)
    assert float(line.rsplit(" ", 1)[1]) == before + 1
    assert "kotaemon_http_request_duration_seconds_bucket" in text


def _start_redis(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, timeout=10, proc=proc)
    return proc


@pytest.mark.slow
def test_readyz_names_failing_checks_when_redis_stops(user):
    from apps.core.services import api_key_create

    auth = {"Authorization": f"Bearer {api_key_create(user=user).raw_key}"}
    port = free_port()
    redis_proc = _start_redis(port)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        with asgi_server(server_env(REDIS_URL=url, REDIS_TIMEOUT="0.5")) as (addr, _):
            ok = httpx.get(f"http://{addr}/readyz", timeout=15)
            assert ok.status_code == 200, ok.text
            assert ok.json()["checks"]["cache"]["detail"] == "RedisCache"
            assert httpx.get(f"http://{addr}/api/v1/me/", headers=auth, timeout=15).status_code == 200
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
            down = httpx.get(f"http://{addr}/readyz", timeout=15)
            assert down.status_code == 503
            assert set(down.json()["failing"]) == {"cache", "channel_layer"}
            assert down.json()["checks"]["database"]["ok"] is True
            assert httpx.get(f"http://{addr}/healthz", timeout=5).status_code == 200
            # An API request that needs Redis (rate limits live there) is an outage, not a bug: 503.
            api = httpx.get(f"http://{addr}/api/v1/me/", headers=auth, timeout=15)
            assert api.status_code == 503, api.text
            assert api.json()["error"]["code"] == "service_unavailable"
            assert api.json()["error"]["details"] == {"dependency": "redis"}
    finally:
        redis_proc.kill()


@pytest.mark.slow
def test_readyz_with_unreachable_redis():
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with asgi_server(server_env(REDIS_URL=url, REDIS_TIMEOUT="0.5")) as (addr, _):
        response = httpx.get(f"http://{addr}/readyz", timeout=15)
        assert response.status_code == 503
        assert set(response.json()["failing"]) == {"cache", "channel_layer"}
