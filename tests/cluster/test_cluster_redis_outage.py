"""Redis goes away and comes back (empty, as after a restart without persistence): the instances report
unready meanwhile, stay alive, and then heal without a restart: they re-subscribe, re-register, and
events reach every instance again."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster.harness import Cluster, wait_until
from tests.helpers import free_port, wait_for_port

# transaction=True: the rows this test creates must be committed for the server processes to see them.
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

WEB = ["web1", "web2"]


def start_redis(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, timeout=10, proc=proc)
    return proc


def test_instances_heal_after_a_redis_restart(request):
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from apps.core.services import api_key_create

    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        pytest.skip("the cluster tests run on PostgreSQL: set DATABASE_URL (CI does)")
    port = free_port()
    redis_proc = start_redis(port)
    workdir = Path(tempfile.mkdtemp(prefix="kotaemon-cluster-outage-"))
    c = Cluster(redis_url=f"redis://127.0.0.1:{port}/0", workdir=workdir, extra_env={
        "REDIS_TIMEOUT": "0.5", "API_KEY_CACHE_SECONDS": "300", "GENERATOR": "extractive"})
    user = get_user_model().objects.create_user("outage-user", password="pw-outage-123")
    key = api_key_create(user=user)
    failed_before = request.session.testsfailed
    try:
        for name in WEB:
            c.start_instance(name)
        c.wait_ready()
        me = {n: f"{c.instances[n].url}/api/v1/me/" for n in WEB}
        auth = {"Authorization": f"Bearer {key.raw_key}"}
        assert all(httpx.get(url, headers=auth, timeout=10).status_code == 200 for url in me.values())

        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        for name in WEB:
            url = c.instances[name].url
            ready = httpx.get(f"{url}/readyz", timeout=15)
            assert ready.status_code == 503 and {"cache", "channel_layer"} <= set(ready.json()["failing"])
            assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200  # alive: no restart wanted
        down_for = time.monotonic()
        time.sleep(2.0)  # heartbeats and the listener fail meanwhile; nothing may crash
        assert all(c.instances[n].alive() for n in WEB)

        redis_proc = start_redis(port)  # back, and empty
        healed = wait_until(lambda: all(httpx.get(f"{c.instances[n].url}/readyz", timeout=15).status_code == 200
                                        for n in WEB)
                            and {r["id"] for r in c.records() if r.get("subscribed")}
                            >= {c.instance_id(n) for n in WEB}, timeout=30, every=0.2,
                            message="ready, registered and subscribed again")
        print(f"\n[cluster] Redis restarted after {time.monotonic() - down_for:.1f} s down: both instances ready, "
              f"registered and subscribed again ({healed})")
        # Events flow again: a revoke on web1 reaches web2's cached lookup.
        assert httpx.get(me["web2"], headers=auth, timeout=10).status_code == 200
        revoked = httpx.post(f"{c.instances['web1'].url}/api/v1/api-keys/{key.api_key.pk}/revoke/", headers=auth,
                             timeout=10)
        assert revoked.status_code == 200, revoked.text
        wait_until(lambda: httpx.get(me["web2"], headers=auth, timeout=10).status_code == 401, timeout=5,
                   message="web2 refuses the key revoked on web1")
    finally:
        c.stop()
        redis_proc.kill()
        if request.session.testsfailed == failed_before:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"[cluster] process logs kept in {workdir}")
