"""Cluster benchmarks: event propagation, chat throughput with 1 and 3 instances behind nginx, and
document-edit-to-answer latency.

Builds a throw-away installation in its own PostgreSQL database (created on the server named by
--database-url, dropped at the end), a Redis key prefix and Celery queue of its own, then starts real
processes with tests/cluster/harness.py: 3 uvicorn instances, 1 Celery worker, nginx with
deploy/nginx.conf.

  1. event propagation: N events published one at a time (apps.core.events.publish, as a service
     would); each instance records when it applied each one (its registry record's last_event), so the
     latency is publish -> applied on that instance, per event and per instance; idle, then again while
     the cluster serves chat traffic;
  2. chat throughput: C concurrent clients, each its own conversation (X-Session-ID, so nginx keeps
     affinity), for D seconds, through nginx with 1 upstream and then with 3; extractive generator,
     retrieval cache off (every turn embeds and searches);
  3. edit-to-answer: an editor saves a new version of a document in the admin, K times; the time until
     every instance answers from it, split into ingest + rebuild on the worker (until the
     knowledge_updated event) and propagation (event -> answer), with production defaults
     (KNOWLEDGE_REBUILD_DELAY_SECONDS=2 coalesces bursts of edits).

Usage:
  .venv/bin/python benchmarks/cluster_bench.py [--database-url postgres://postgres@127.0.0.1:5432/test]
      [--redis-url redis://127.0.0.1:6379/13] [--events 100] [--clients 6] [--duration 20] [--edits 5]

Everything runs on 127.0.0.1; every loop is bounded in count and time. Results: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))

QUESTIONS = ["How many days do I have to return an item?", "What does express shipping cost?",
             "When is customer support available?", "How do I create an API key?",
             "What is the password policy?", "How long does a refund take?"]
WARRANTY = ("# Warranty statement\n\nThe current warranty statement is edition-marker-{n:03d}. Every product "
            "carries a two-year warranty against manufacturing defects from the date of delivery.\n")
WARRANTY_QUESTION = "Which edition of the warranty statement is current?"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[max(0, min(len(values) - 1, round(p / 100 * (len(values) - 1))))]


def summary(values: list[float], scale: float = 1000.0) -> str:
    return (f"p50 {pct(values, 50) * scale:.1f} / p95 {pct(values, 95) * scale:.1f} / max {max(values) * scale:.1f}"
            if values else "no samples")


def run_manage(env: dict, *args: str) -> None:
    out = subprocess.run([PY, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"manage.py {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def admin_connection(url: str):
    import psycopg

    return psycopg.connect(url, autocommit=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--edits", type=int, default=5)
    args = parser.parse_args()
    if not args.database_url.startswith("postgres"):
        raise SystemExit("--database-url must name a PostgreSQL server: several processes write at once")

    db_name = f"kotaemon_cluster_bench_{os.getpid()}"
    bench_db = with_database(args.database_url, db_name)
    workdir = Path(tempfile.mkdtemp(prefix="kotaemon-cluster-bench-"))
    prefix = f"kb{uuid.uuid4().hex[:10]}"
    with admin_connection(args.database_url) as conn:
        conn.execute(f'CREATE DATABASE "{db_name}"')
    base_env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CELERY_BROKER_URL")}
    base_env.update({"DATABASE_URL": bench_db, "KOTAEMON_DATA_DIR": str(workdir / "data"),
                     "INDEX_ROOT": str(workdir / "data" / "indexes"), "MEDIA_ROOT": str(workdir / "data" / "media"),
                     "KOTAEMON_TESTING": "1", "SECRET_KEY": "bench-" + "x" * 60, "ALLOWED_HOSTS": "127.0.0.1,localhost",
                     "SECURE_SSL_REDIRECT": "0", "LOG_LEVEL": "WARNING"})
    cluster = None
    try:
        print(f"setup: database {db_name}, data {workdir}", flush=True)
        run_manage(base_env, "migrate", "--noinput", "-v0")
        run_manage(base_env, "demo_setup", "--username", "bench-editor", "--password", "bench-editor-pw")
        os.environ.update({k: v for k, v in base_env.items() if k != "LOG_LEVEL"})
        os.environ.update({"REDIS_URL": args.redis_url, "CACHE_KEY_PREFIX": prefix, "LOG_LEVEL": "WARNING",
                           "DJANGO_SETTINGS_MODULE": "kotaemon_site.settings", "CELERY_BROKER_URL": args.redis_url,
                           "CELERY_TASK_DEFAULT_QUEUE": f"{prefix}-tasks", "CELERY_TASK_ALWAYS_EAGER": "0"})
        import django

        django.setup()
        from tests.cluster.harness import Cluster

        # Created here so that the finally below stops its processes whatever run() does.
        cluster = Cluster(redis_url=args.redis_url, workdir=workdir, prefix=prefix, extra_env={
            "GENERATOR": "extractive", "RETRIEVAL_CACHE_SECONDS": "0", "LOG_LEVEL": "WARNING",
            "CLUSTER_HEARTBEAT_SECONDS": "0.2", "CLUSTER_RECONCILE_SECONDS": "3", "CLUSTER_INSTANCE_TTL_SECONDS": "15"})
        run(args, cluster)
    finally:
        if cluster is not None:
            cluster.stop()
            cluster.cleanup_redis()
        with admin_connection(args.database_url) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        shutil.rmtree(workdir, ignore_errors=True)


def run(args, cluster) -> None:
    import httpx
    from django.contrib.auth import get_user_model

    from apps.core import events
    from apps.core.services import api_key_create
    from tests.cluster.harness import AdminSession, wait_until

    user = get_user_model().objects.create_user("bench-user", password="bench-user-pw")
    key = api_key_create(user=user).raw_key
    editor = get_user_model().objects.get(username="bench-editor")
    editor_key = api_key_create(user=editor).raw_key
    web = ["web1", "web2", "web3"]
    for name in web:
        cluster.start_instance(name)
    cluster.start_worker()
    cluster.wait_ready(timeout=300)
    headers = {"Authorization": f"Bearer {key}"}
    http = httpx.Client(timeout=120)
    for name in web:  # load the embedding model in every instance before measuring
        response = http.post(f"{cluster.instances[name].url}/api/v1/chat/", headers=headers,
                             json={"message": QUESTIONS[0]})
        assert response.status_code == 200, response.text
    results: dict = {"cpus": os.cpu_count()}

    # 1. event propagation ---------------------------------------------------------------------------
    def propagate(count: int) -> tuple[list[float], list[float]]:
        lags, publish_costs = [], []
        for _ in range(count):
            event = events.make_event("api_key_revoked", {"key_id": 10**9 + int(uuid.uuid4().int % 10**6)})
            started = time.perf_counter()
            events.publish(event)
            publish_costs.append(time.perf_counter() - started)

            def applied():
                got = {}
                for record in cluster.records():
                    last = (record.get("last_events") or {}).get("api_key_revoked") or {}
                    if record["kind"] == "web" and last.get("id") == event["id"]:
                        got[record["id"]] = last["received"] - event["ts"]
                return got if len(got) == 3 else None

            got = wait_until(applied, timeout=10, every=0.02, message="event applied everywhere")
            lags.extend(got.values())
        return lags, publish_costs

    lags, costs = propagate(args.events)
    results["event_idle"] = {"n": len(lags), "p50_ms": pct(lags, 50) * 1000, "p95_ms": pct(lags, 95) * 1000,
                             "max_ms": max(lags) * 1000, "publish_p50_ms": pct(costs, 50) * 1000}
    print(f"event propagation, idle ({len(lags)} samples = {args.events} events x 3 instances): {summary(lags)} ms; "
          f"publish() call {summary(costs)} ms", flush=True)

    # 2. throughput through nginx, 1 then 3 instances --------------------------------------------------
    if shutil.which("nginx") is None:
        print("nginx is not installed: throughput through the balancer skipped")
    else:
        for upstreams in (["web1"], web):
            lb = cluster.start_nginx(upstreams)
            loaded_lags: list[float] = []
            stats = drive(lb.url, headers, args.clients, args.duration,
                          during=(lambda: loaded_lags.extend(propagate(max(10, args.events // 4))[0]))
                          if len(upstreams) == 3 else None)
            lb.popen.terminate()
            lb.popen.wait(timeout=10)
            results[f"throughput_{len(upstreams)}"] = stats
            print(f"chat through nginx, {len(upstreams)} instance(s), {args.clients} clients, {args.duration:.0f} s: "
                  f"{stats['rps']:.1f} turns/s, latency p50 {stats['p50_ms']:.0f} ms / p95 {stats['p95_ms']:.0f} ms, "
                  f"{stats['errors']} errors, served by {stats['served_by']}", flush=True)
            if loaded_lags:
                results["event_loaded"] = {"n": len(loaded_lags), "p50_ms": pct(loaded_lags, 50) * 1000,
                                           "p95_ms": pct(loaded_lags, 95) * 1000}
                print(f"event propagation under that load ({len(loaded_lags)} samples): {summary(loaded_lags)} ms",
                      flush=True)

    # 3. document edit -> every instance answers from it ----------------------------------------------
    kb = http.get(f"{cluster.instances['web1'].url}/api/v1/knowledge-bases/",
                  headers={"Authorization": f"Bearer {editor_key}"}).json()
    kb_id = next(k["id"] for k in (kb["results"] if isinstance(kb, dict) else kb))
    uploaded = http.post(f"{cluster.instances['web1'].url}/api/v1/knowledge-bases/{kb_id}/documents/",
                         headers={"Authorization": f"Bearer {editor_key}"},
                         files=[("files", ("warranty.md", WARRANTY.format(n=0).encode(), "text/markdown"))])
    doc_id = uploaded.json()["results"][0]["document_id"]
    admin = AdminSession(cluster.instances["web1"].url, "bench-editor", "bench-editor-pw")

    def answers(name: str, marker: str) -> bool:
        response = http.post(f"{cluster.instances[name].url}/api/v1/chat/", headers=headers,
                             json={"message": WARRANTY_QUESTION})
        return response.status_code == 200 and marker in json.dumps(response.json()["citations"])

    for name in web:
        wait_until(lambda: answers(name, "edition-marker-000"), timeout=120, every=0.5)
    totals, rebuilds, propagations = [], [], []
    for n in range(1, args.edits + 1):
        marker = f"edition-marker-{n:03d}"
        admin.change(f"/admin/knowledge/document/{doc_id}/change/",
                     files={"file": ("warranty.md", WARRANTY.format(n=n).encode(), "text/markdown")})
        saved = time.time()
        done: dict[str, float] = {}

        def poll(name: str) -> None:
            deadline = time.time() + 120
            while time.time() < deadline:
                if answers(name, marker):
                    done[name] = time.time()
                    return
                time.sleep(0.05)

        threads = [threading.Thread(target=poll, args=(name,)) for name in web]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(done) == 3, f"edit {n}: only {sorted(done)} answered from it"
        event = next(e for e in cluster.journal() if e["type"] == "knowledge_updated"
                     and e["payload"]["knowledge_base"] == kb_id)
        totals.append(max(done.values()) - saved)
        rebuilds.append(event["ts"] - saved)
        propagations.append(max(done.values()) - event["ts"])
    results["edit_to_answer"] = {"n": len(totals), "p50_s": pct(totals, 50), "p95_s": pct(totals, 95),
                                 "rebuild_p50_s": pct(rebuilds, 50), "propagation_p50_s": pct(propagations, 50),
                                 "propagation_p95_s": pct(propagations, 95)}
    print(f"edit -> all 3 instances answer from it ({len(totals)} edits): {summary(totals, 1)} s; of which "
          f"save -> knowledge_updated (ingest + 2 s coalescing delay + rebuild) {summary(rebuilds, 1)} s, "
          f"event -> last instance answering {summary(propagations, 1)} s", flush=True)
    print(json.dumps(results, indent=2, default=float))


def drive(url: str, headers: dict, clients: int, duration: float, during=None) -> dict:
    import httpx

    latencies: list[float] = []
    served: dict[str, int] = {}
    errors = [0]
    stop = time.monotonic() + duration

    def client(i: int) -> None:
        session = f"bench-{uuid.uuid4().hex[:12]}"
        http = httpx.Client(timeout=120)
        turn = 0
        while time.monotonic() < stop:
            started = time.perf_counter()
            try:
                response = http.post(f"{url}/api/v1/chat/", headers={**headers, "X-Session-ID": session},
                                     json={"message": QUESTIONS[(i + turn) % len(QUESTIONS)], "session_id": session})
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok, response = False, None
            if ok:
                latencies.append(time.perf_counter() - started)
                name = response.headers.get("x-instance-id", "?").split("-")[0]
                served[name] = served.get(name, 0) + 1
            else:
                errors[0] += 1
            turn += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    if during is not None:
        time.sleep(min(2.0, duration / 4))
        during()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    return {"turns": len(latencies), "rps": len(latencies) / elapsed, "p50_ms": pct(latencies, 50) * 1000,
            "p95_ms": pct(latencies, 95) * 1000, "errors": errors[0], "served_by": dict(sorted(served.items()))}


if __name__ == "__main__":
    main()
