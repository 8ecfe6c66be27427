"""Several stateless instances behave as one: 3 uvicorn processes on different ports and 1 Celery worker,
on the test database (PostgreSQL with DATABASE_URL) and the real Redis.

The scenarios run in file order on one cluster (booting it is the expensive part):
  registry   every instance and the worker heartbeat; cluster_status shows them
  (e)        duplicated, delayed, out-of-order and malformed events change nothing
  (d)        a revoked API key is refused by every instance; a plugin disabled in the admin is invoked
             by no instance afterwards
  (a)        one conversation whose turns alternate between instances keeps its full context
  (c)        an editor changes a document: during the rebuild and swap, requests to every instance never
             fail and never mix versions; the propagation time is measured and printed
  (b)        kill -9 of the instance that served the last turn: the next turn continues elsewhere
  nginx      (a) and (b) again through deploy/nginx.conf, where nginx is installed
"""
from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.cluster.harness import Cluster, FakeLLM, metric, seen_dialogue, wait_until
from tests.helpers import ROOT, VENV_BIN

# django_db: pytest-django creates the test database only for sessions with marked tests. The tests
# themselves change data through the instances' HTTP APIs (the module fixture commits its setup rows).
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.django_db]

WEB = ["web1", "web2", "web3"]
POLICY_V1 = ("# Returns policy\n\nEDITION-ALPHA. Customers may return unopened items within 30 days of delivery "
             "for a full refund. Refunds are paid to the original payment method. EDITION-ALPHA.\n")
POLICY_V2 = ("# Returns policy\n\nEDITION-BRAVO. Customers may return unopened items within 45 days of delivery "
             "for a full refund. Refunds are paid to the original payment method. EDITION-BRAVO.\n")
SHIPPING = ("# Shipping\n\nStandard shipping takes 3 to 5 business days. Express shipping takes one business day "
            "and costs extra.\n")
RETURN_QUESTION = "How many days do customers have to return unopened items?"


class Client:
    """One user's API key against the cluster's instances."""

    def __init__(self, cluster: Cluster, raw_key: str):
        self.cluster = cluster
        self.headers = {"Authorization": f"Bearer {raw_key}"}
        self.http = httpx.Client(timeout=60)

    def url(self, target: str) -> str:
        return self.cluster.instances[target].url if target in self.cluster.instances else target

    def get(self, target: str, path: str, **kw) -> httpx.Response:
        return self.http.get(self.url(target) + path, headers=self.headers, **kw)

    def post(self, target: str, path: str, **kw) -> httpx.Response:
        return self.http.post(self.url(target) + path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def chat(self, target: str, message: str, session_id: str | None = None, **kw) -> httpx.Response:
        body = {"message": message, "knowledge_bases": ["policies"]}
        if session_id:
            body["session_id"] = session_id
        return self.post(target, "/api/v1/chat/", json=body, **kw)


def editions(response: httpx.Response) -> set[str]:
    text = " ".join(c.get("snippet") or "" for c in response.json()["citations"])
    return set(re.findall(r"EDITION-(ALPHA|BRAVO)", text))


@pytest.fixture(scope="module")
def cluster(request, django_db_setup, django_db_blocker, redis_url):
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from apps.core.services import api_key_create

    llm = FakeLLM()
    # Not pytest's tmp_path: concurrent runs rotate those away, and the logs are what explains a failure.
    workdir = Path(tempfile.mkdtemp(prefix="kotaemon-cluster-"))
    print(f"\n[cluster] process logs in {workdir}")
    c = Cluster(redis_url=redis_url, workdir=workdir,
                extra_env={"GENERATOR": "openai", "LLM_BASE_URL": llm.base_url, "LLM_MODEL": "fake",
                           "API_KEY_CACHE_SECONDS": "300", "KNOWLEDGE_REBUILD_DELAY_SECONDS": "0.2"})
    c.llm = llm
    with django_db_blocker.unblock():
        User = get_user_model()
        editor = User.objects.create_user("cl-editor", password="pw-editor-123", is_staff=True, is_superuser=True)
        alice = User.objects.create_user("cl-alice", password="pw-alice-123")
        c.keys = {"editor": api_key_create(user=editor).raw_key, "alice": api_key_create(user=alice).raw_key}
    failed_before, keep_logs = request.session.testsfailed, True
    try:
        for name in WEB:
            c.start_instance(name)
        c.start_worker()
        c.wait_ready()
        c.editor, c.alice = Client(c, c.keys["editor"]), Client(c, c.keys["alice"])
        _create_knowledge(c)
        yield c
        keep_logs = request.session.testsfailed > failed_before
    finally:
        c.stop()
        llm.stop()
        c.cleanup_redis()
        with django_db_blocker.unblock():
            call_command("flush", interactive=False, verbosity=0)
        if not keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)


def _create_knowledge(c: Cluster) -> None:
    created = c.editor.post("web1", "/api/v1/knowledge-bases/", json={"slug": "policies", "name": "Policies",
                                                                        "is_public": True})
    assert created.status_code == 201, created.text
    c.kb_id = created.json()["id"]
    files = [("files", ("returns-policy.md", POLICY_V1.encode(), "text/markdown")),
             ("files", ("shipping.md", SHIPPING.encode(), "text/markdown"))]
    uploaded = c.editor.post("web2", f"/api/v1/knowledge-bases/{c.kb_id}/documents/", files=files)
    assert uploaded.status_code == 201, uploaded.text
    c.policy_id = next(o["document_id"] for o in uploaded.json()["results"] if o["name"] == "returns-policy.md")
    # The worker ingests and builds; every instance must then answer from the ALPHA edition.
    for name in WEB:
        wait_until(lambda: (r := c.alice.chat(name, RETURN_QUESTION)).status_code == 200 and editions(r) == {"ALPHA"},
                   timeout=120, every=0.5, message=f"{name} answers from the first index version")


def ensure_three(c: Cluster) -> None:
    """Replace any killed instance (a new process, a new id) and wait until all are ready."""
    for name in WEB:
        if not c.instances[name].alive():
            c.start_instance(name)
    c.wait_ready()


def metrics_of(c: Cluster, name: str) -> str:
    return httpx.get(f"{c.instances[name].url}/metrics", timeout=10).text


# --- registry ---------------------------------------------------------------------------------
def test_every_instance_and_the_worker_heartbeat(cluster):
    kb = str(cluster.kb_id)
    # Every instance has answered from the index, so each holds a version of it.
    records = wait_until(lambda: (rs := {r["id"]: r for r in cluster.records()}) and all(
        (rs.get(cluster.instance_id(n)) or {}).get("indexes", {}).get(kb, 0) >= 1 for n in WEB) and rs, timeout=10)
    for name in WEB:
        record = records[cluster.instance_id(name)]
        assert record["kind"] == "web" and record["ready"] and record["subscribed"]
        assert record["port"] == cluster.instances[name].port and record["pid"] == cluster.instances[name].popen.pid
    worker = records[cluster.instance_id("worker")]
    assert worker["kind"] == "worker" and worker["subscribed"]
    env = cluster.env("cluster-status-cli")
    out = subprocess.run([str(VENV_BIN / "python"), "manage.py", "cluster_status"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["instance", "kind", "host"]
    assert [line.split()[0] for line in lines[1:]] == sorted(cluster.instance_id(n) for n in WEB) + [
        cluster.instance_id("worker")]
    print(f"\n[cluster] manage.py cluster_status\n{out.stdout}")
