"""Chat benchmarks: turn latency (extractive), websocket time to first token, REST throughput.

Builds a throw-away demo installation (migrate + demo_setup into a temporary data directory),
then measures against a real uvicorn process:

  1. chat turn latency p50/p95, in-process (chat_turn called directly, extractive generator);
  2. websocket time to first token and to the final answer;
  3. REST chat throughput with 1, 8 and 32 concurrent clients on one uvicorn instance,
     with the embedded defaults (SQLite, in-memory session store) and Redis-backed settings
     (REDIS_URL: django-redis cache, Redis session store, channels-redis; plus DATABASE_URL if given).

Usage:
  .venv/bin/python benchmarks/chat_latency.py [--turns 100] [--duration 10] [--redis-url redis://127.0.0.1:6379/14]
      [--database-url postgres://postgres@127.0.0.1:5432/bench] [--retrieval-cache]

Retrieval results are cached by default in production (RETRIEVAL_CACHE_SECONDS); the benchmark
turns that cache off unless --retrieval-cache is given, so every turn embeds and searches.
Traffic goes to 127.0.0.1 only; every loop is bounded in count and time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    ("How many days do I have to return an item?", False),
    ("and how long does the refund take?", True),
    ("What does express shipping cost?", False),
    ("When is customer support available?", False),
    ("How do I create an API key?", False),
    ("What is the password policy?", False),
]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = max(0, min(len(values) - 1, round(p / 100 * (len(values) - 1))))
    return values[k]


def run_manage(env: dict, *args: str, input_text: str | None = None) -> str:
    out = subprocess.run([PY, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         input=input_text, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"manage.py {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def prepare(env: dict) -> str:
    """Migrate, load the demo knowledge base, create a benchmark user; returns an API key."""
    run_manage(env, "migrate", "--noinput")
    run_manage(env, "demo_setup", "--password", "bench-admin-pw")
    code = ("from django.contrib.auth import get_user_model\n"
            "from apps.core.services import api_key_create\n"
            "u, _ = get_user_model().objects.get_or_create(username='bench')\n"
            "print('KEY=' + api_key_create(user=u, name='bench').raw_key)\n")
    out = run_manage(env, "shell", "-c", code)
    return next(line[4:] for line in out.splitlines() if line.startswith("KEY="))


def inprocess_latency(env: dict, turns: int) -> dict:
    code = f"""
import json, time
from apps.core.runtime import configure_process
configure_process(kind="web")  # the same thread settings as a web process (uvicorn)
from django.contrib.auth import get_user_model
from apps.conversations.services import chat_turn
QUESTIONS = {QUESTIONS!r}
user = get_user_model().objects.get(username='bench')
chat_turn(user=user, session_id=None, message='warm up the models')
lat = []
sid = None
for i in range({turns}):
    q, follow = QUESTIONS[i % len(QUESTIONS)]
    t = time.perf_counter()
    r = chat_turn(user=user, session_id=sid if follow else None, message=q)
    lat.append((time.perf_counter() - t) * 1000)
    sid = r.session_id
print('RESULT=' + json.dumps(lat))
"""
    out = run_manage(env, "shell", "-c", code)
    lat = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT=")))
    return {"turns": len(lat), "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "mean_ms": statistics.mean(lat)}


class Server:
    def __init__(self, env: dict):
        from tests.helpers import free_port, wait_for_port

        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(Path(PY).parent / "uvicorn"), "kotaemon_site.asgi:application", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning", "--no-access-log"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(os.environ.get("BENCH_SERVER_LOG", os.devnull), "w"))
        wait_for_port(self.port, timeout=120, proc=self.proc)
        self.addr = f"127.0.0.1:{self.port}"

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def websocket_ttft(addr: str, key: str, turns: int) -> dict:
    from websockets.sync.client import connect

    ttft, total = [], []
    headers = {"Authorization": f"Bearer {key}"}
    for i in range(turns + 1):
        q, _ = QUESTIONS[i % len(QUESTIONS)]
        with connect(f"ws://{addr}/ws/chat/bench-ws-{uuid.uuid4().hex[:12]}/", origin=f"http://{addr}",
                     additional_headers=headers) as ws:
            start = time.perf_counter()
            ws.send(json.dumps({"type": "message", "message": q}))
            first = None
            while True:
                frame = json.loads(ws.recv(timeout=60))
                if frame["type"] == "token" and first is None:
                    first = time.perf_counter() - start
                if frame["type"] in ("answer", "error"):
                    break
            if i == 0:
                continue  # warm-up (model load in the server)
            ttft.append((first or 0) * 1000)
            total.append((time.perf_counter() - start) * 1000)
    return {"turns": len(ttft), "ttft_p50_ms": pct(ttft, 50), "ttft_p95_ms": pct(ttft, 95),
            "answer_p50_ms": pct(total, 50), "answer_p95_ms": pct(total, 95)}


def rest_throughput(addr: str, key: str, clients: int, duration: float) -> dict:
    import httpx

    lat: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def client(i: int):
        sid = None
        with httpx.Client(base_url=f"http://{addr}", headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
            n = 0
            while time.monotonic() < stop_at and n < 10_000:
                q, follow = QUESTIONS[(i + n) % len(QUESTIONS)]
                t = time.perf_counter()
                try:
                    resp = http.post("/api/v1/chat/", json={"message": q, **({"session_id": sid} if follow and sid else {})})
                    ok = resp.status_code == 200
                    code = "ok" if ok else resp.json().get("error", {}).get("code", str(resp.status_code))
                except httpx.HTTPError as exc:
                    ok, code = False, type(exc).__name__
                elapsed = (time.perf_counter() - t) * 1000
                with lock:
                    if ok:
                        lat.append(elapsed)
                        sid = resp.json()["session_id"]
                    else:
                        errors[code] = errors.get(code, 0) + 1
                n += 1

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    return {"clients": clients, "requests": len(lat), "errors": errors, "wall_s": round(wall, 1),
            "rps": len(lat) / wall, "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--ws-turns", type=int, default=30)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--database-url", default="", help="for the Redis-backed run (default: SQLite)")
    parser.add_argument("--retrieval-cache", action="store_true")
    parser.add_argument("--skip-redis", action="store_true")
    parser.add_argument("--skip-default", action="store_true")
    parser.add_argument("--db-conn-max-age", default="0",
                        help="DB_CONN_MAX_AGE for the PostgreSQL run. Under ASGI every worker thread keeps its own "
                             "persistent connection, so a non-zero value can exhaust max_connections under load.")
    args = parser.parse_args()

    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")}
    base.update({"KOTAEMON_DEMO": "1", "DEBUG": "0", "LOG_LEVEL": "WARNING", "ACCESS_LOG_LEVEL": "WARNING",
                 "CHAT_RATE_LIMIT": "1000000/min", "API_RATE_LIMIT": "1000000/min", "PYTHONUNBUFFERED": "1"})
    if not args.retrieval_cache:
        base["RETRIEVAL_CACHE_SECONDS"] = "0"
    configs = [] if args.skip_default else [("default (SQLite, in-memory session store)", {})]
    if not args.skip_redis:
        redis_env = {"REDIS_URL": args.redis_url, "SESSION_STORE_BACKEND": "redis",
                     "CACHE_KEY_PREFIX": f"bench{uuid.uuid4().hex[:6]}", "CELERY_TASK_ALWAYS_EAGER": "1"}
        if args.database_url:
            redis_env["DATABASE_URL"] = args.database_url
            redis_env["DB_CONN_MAX_AGE"] = args.db_conn_max_age
        label = "Redis-backed (" + ("PostgreSQL, " if args.database_url else "SQLite, ") + "Redis session store)"
        configs.append((label, redis_env))

    report: dict = {"cpu_count": os.cpu_count(), "configs": []}
    for label, extra in configs:
        with tempfile.TemporaryDirectory(prefix="kotaemon-bench-") as data_dir:
            env = dict(base, KOTAEMON_DATA_DIR=data_dir, **extra)
            print(f"== {label}: preparing", flush=True)
            key = prepare(env)
            entry: dict = {"label": label}
            print("   in-process chat_turn latency", flush=True)
            entry["inprocess"] = inprocess_latency(env, args.turns)
            print("   ", entry["inprocess"], flush=True)
            server = Server(env)
            try:
                print("   websocket time to first token", flush=True)
                entry["websocket"] = websocket_ttft(server.addr, key, args.ws_turns)
                print("   ", entry["websocket"], flush=True)
                entry["rest"] = []
                for clients in [int(c) for c in args.clients.split(",")]:
                    result = rest_throughput(server.addr, key, clients, args.duration)
                    print("   ", result, flush=True)
                    entry["rest"].append(result)
            finally:
                server.stop()
            report["configs"].append(entry)
    print("RESULT " + json.dumps(report))
    print_markdown(report)


def print_markdown(report: dict) -> None:
    print("\n| configuration | turns | p50 ms | p95 ms |\n|---|---|---|---|")
    for c in report["configs"]:
        r = c["inprocess"]
        print(f"| {c['label']} | {r['turns']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} |")
    print("\n| configuration | turns | first token p50 ms | p95 ms | answer p50 ms | p95 ms |\n|---|---|---|---|---|---|")
    for c in report["configs"]:
        r = c["websocket"]
        print(f"| {c['label']} | {r['turns']} | {r['ttft_p50_ms']:.1f} | {r['ttft_p95_ms']:.1f} | "
              f"{r['answer_p50_ms']:.1f} | {r['answer_p95_ms']:.1f} |")
    print("\n| configuration | clients | requests | errors | req/s | p50 ms | p95 ms |\n|---|---|---|---|---|---|---|")
    for c in report["configs"]:
        for r in c["rest"]:
            errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
            print(f"| {c['label']} | {r['clients']} | {r['requests']} | {errors} | {r['rps']:.1f} | "
                  f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} |")


if __name__ == "__main__":
    main()
