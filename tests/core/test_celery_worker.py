"""A real Celery worker process against the real Redis broker."""
import subprocess

import pytest

from tests.helpers import ROOT, VENV_BIN, server_env


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_real_worker_runs_a_task(redis_url):
    from celery import Celery

    env = server_env(REDIS_URL=redis_url, CELERY_BROKER_URL=redis_url, CELERY_RESULT_BACKEND=redis_url)
    queue = "test-ping"
    worker = subprocess.Popen(
        [str(VENV_BIN / "celery"), "-A", "kotaemon_site", "worker", "--pool=solo", "-Q", queue, "-l", "warning",
         "--without-heartbeat", "--without-gossip", "--without-mingle"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    client = Celery(broker=redis_url, backend=redis_url, set_as_current=False)  # the platform app stays current
    try:
        result = client.send_task("core.ping", args=["hello"], queue=queue)
        value = result.get(timeout=90)
    finally:
        worker.terminate()
        output = worker.communicate(timeout=30)[0].decode(errors="replace")
    assert value["value"] == "hello", output
    assert value["pid"] == worker.pid


def test_eager_mode_in_embedded_default_propagates_errors(settings):
    from kotaemon_site.celery import app

    assert app.conf.task_always_eager is settings.CELERY_TASK_ALWAYS_EAGER
    assert app.conf.task_acks_late is True and app.conf.task_serializer == "json"
    assert app.conf.task_time_limit > app.conf.task_soft_time_limit > 0
