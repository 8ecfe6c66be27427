"""Streaming benchmarks: time to first token over SSE, the websocket and the OpenAI API; the cost of
buffering every token in the turn's event log; takeover time after kill -9 of the generating instance.

All variants of a measurement run side by side in one run (interleaved), because this machine is shared
and noisy:

  1. token path: N tokens through (a) a bare callback (what the token path was before the log),
     (b) the memory event log, (c) the Redis event log (fenced XADD by Lua), each with a local reader
     that receives every event; microseconds per token, wall and CPU time;
  2. time to first token and to the answer for one uvicorn instance, interleaved per question: websocket,
     REST SSE (POST /api/v1/chat/ "stream": true), OpenAI stream (/v1/chat/completions); a streaming
     OpenAI-compatible model at 20 ms per word (30 words), once with the memory log, once with Redis;
  3. takeover: two uvicorn instances on Redis (and PostgreSQL with --database-url), a deliberately slow
     OpenAI-compatible model (tests/conversations/slow_llm.py, one word per --delay s); a websocket on
     instance A streams an answer, A is killed with SIGKILL after 5 tokens, the client reconnects to B and
     resumes; kill -> first event from B, kill -> first new token, kill -> complete answer.

Usage:
  .venv/bin/python benchmarks/stream_latency.py [--tokens 2000] [--turns 20] [--takeovers 3]
      [--redis-url redis://127.0.0.1:6379/14] [--database-url postgres://postgres@127.0.0.1:5432/bench]
      [--lease 2] [--delay 0.05]
Traffic goes to 127.0.0.1 only; every loop is bounded in count and time.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.chat_latency import QUESTIONS, Server, pct, prepare, run_manage  # noqa: E402


def token_path(env: dict, tokens: int) -> dict:
    code = f"""
import asyncio, json, threading, time
from django.conf import settings
from apps.conversations import turn_stream as ts

N = {tokens}
results = {{}}

def measure(label, make_emit):
    emit, done = make_emit()
    t, c = time.perf_counter(), time.process_time()
    for i in range(N):
        emit({{"type": "token", "text": "word "}})
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    got = done()
    results[label] = {{"us_per_token_wall": 1e6 * wall / N, "us_per_token_cpu": 1e6 * cpu / N, "received": got}}

def bare():
    seen = []
    return (lambda e: seen.append(e)), (lambda: len(seen))

def via_log(backend_name):
    def make():
        settings.TURN_STREAM_BACKEND = backend_name
        ts.turn_stream_reset()
        turn_id = ts.new_turn_id()
        writer = ts.turn_create(turn_id, spec={{}}, session_id="bench-" + turn_id[:8])
        seen = []
        unsubscribe = ts._subscribe(turn_id, seen.append)  # the local reader's fan-out
        def done():
            unsubscribe()
            writer.emit({{"type": "answer"}})
            return len(seen) - 1
        return writer.emit, done
    return make

for round_ in range(3):  # interleaved rounds; the last one is reported
    measure("bare callback", bare)
    measure("memory log", via_log("memory"))
    if settings.REDIS_URL:
        measure("redis log", via_log("redis"))
print("RESULT=" + json.dumps(results))
"""
    out = run_manage(env, "shell", "-c", code)
    return json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT=")))


def warm_up(addr: str, key: str) -> None:
    import httpx

    resp = httpx.post(f"http://{addr}/api/v1/chat/", json={"message": "warm up"}, timeout=300,
                      headers={"Authorization": f"Bearer {key}"})
    if resp.status_code != 200:
        raise SystemExit(f"warm-up failed: {resp.status_code} {resp.text[:300]}")


def first_tokens(addr: str, key: str, turns: int) -> dict:
    import httpx
    from websockets.sync.client import connect

    headers = {"Authorization": f"Bearer {key}"}
    res: dict[str, dict[str, list[float]]] = {k: {"ttft": [], "answer": []} for k in ("websocket", "sse", "openai")}

    def ws_turn(q: str):
        with connect(f"ws://{addr}/ws/chat/bench-{uuid.uuid4().hex[:12]}/", origin=f"http://{addr}",
                     additional_headers=headers) as ws:
            start, first = time.perf_counter(), None
            ws.send(json.dumps({"type": "message", "message": q}))
            while True:
                frame = json.loads(ws.recv(timeout=60))
                if frame["type"] == "token" and first is None:
                    first = time.perf_counter() - start
                if frame["type"] in ("answer", "error"):
                    return first, time.perf_counter() - start

    def sse_turn(http, path: str, body: dict):
        start, first = time.perf_counter(), None
        with http.stream("POST", path, json=body) as resp:
            for line in resp.iter_lines():
                if first is None and (line.startswith("event: token") or '"content":"' in line and '"content":""' not in line):
                    first = time.perf_counter() - start
        return first, time.perf_counter() - start

    with httpx.Client(base_url=f"http://{addr}", headers=headers, timeout=60) as http:
        for i in range(turns + 1):
            q, _ = QUESTIONS[i % len(QUESTIONS)]
            runs = {"websocket": ws_turn(q),
                    "sse": sse_turn(http, "/api/v1/chat/", {"message": q, "stream": True}),
                    "openai": sse_turn(http, "/v1/chat/completions", {"model": "kotaemon-all", "stream": True,
                                                                        "messages": [{"role": "user", "content": q}]})}
            if i == 0:
                continue  # warm-up
            for k, (first, total) in runs.items():
                res[k]["ttft"].append(1000 * (first or total))
                res[k]["answer"].append(1000 * total)
    return {k: {"turns": len(v["ttft"]), "ttft_p50_ms": pct(v["ttft"], 50), "ttft_p95_ms": pct(v["ttft"], 95),
                "answer_p50_ms": pct(v["answer"], 50), "answer_p95_ms": pct(v["answer"], 95)} for k, v in res.items()}


def takeover(env: dict, key: str, rounds: int, delay: float) -> list[dict]:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from tests.conversations.slow_llm import SlowLLM

    llm = SlowLLM(delay=delay, words=60)
    env = dict(env, GENERATOR="openai", LLM_BASE_URL=llm.base_url, LLM_MODEL="slow")
    headers = {"Authorization": f"Bearer {key}"}
    results = []
    b = Server(env)
    warm_up(b.addr, key)
    try:
        for r in range(rounds):
            a = Server(env)
            try:
                warm_up(a.addr, key)  # a ready instance (models loaded), as behind a load balancer
                sid = f"bench-take-{uuid.uuid4().hex[:10]}"
                question = "How many days do I have to return an item?"
                frames, stamps = [], []
                with connect(f"ws://{a.addr}/ws/chat/{sid}/", origin=f"http://{a.addr}", additional_headers=headers) as ws:
                    ws.send(json.dumps({"type": "message", "message": question}))
                    while sum(f["type"] == "token" for f in frames) < 5:
                        frames.append(json.loads(ws.recv(timeout=120)))
                        stamps.append(time.perf_counter())
                        if frames[-1]["type"] in ("answer", "error"):
                            raise SystemExit(f"the answer ended before the kill: {frames[-1]}")
                    killed = time.perf_counter()
                    os.kill(a.proc.pid, signal.SIGKILL)
                    try:
                        while True:
                            frames.append(json.loads(ws.recv(timeout=10)))
                            stamps.append(time.perf_counter())
                    except (ConnectionClosed, TimeoutError):
                        pass
                with connect(f"ws://{b.addr}/ws/chat/{sid}/", origin=f"http://{b.addr}", additional_headers=headers) as ws:
                    ws.send(json.dumps({"type": "resume", "turn_id": frames[0]["turn_id"], "offset": frames[-1]["offset"]}))
                    first_event = first_token = None
                    while True:
                        frame = json.loads(ws.recv(timeout=120))
                        now = time.perf_counter()
                        first_event = first_event or now
                        if frame["type"] == "token" and first_token is None:
                            first_token = now
                        frames.append(frame)
                        if frame["type"] in ("answer", "error"):
                            break
                text = ""
                for f in frames:
                    text = "" if f["type"] == "reset" else text + (f.get("text") or "") if f["type"] == "token" else text
                ok = frames[-1]["type"] == "answer" and text.strip() == frames[-1]["answer"] == llm.expected(question)
                offsets_ok = [f["offset"] for f in frames] == list(range(1, len(frames) + 1))
                results.append({"kill_to_first_event_s": first_event - killed,
                                "kill_to_first_new_token_s": (first_token or now) - killed,
                                "kill_to_answer_s": now - killed, "gap_s": (first_token or now) - stamps[4],
                                "complete_and_exact": ok and offsets_ok})
                print("   ", results[-1], flush=True)
            finally:
                a.stop()
    finally:
        b.stop()
        llm.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--takeovers", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--lease", default="2")
    parser.add_argument("--delay", type=float, default=0.05)
    args = parser.parse_args()

    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")}
    base.update({"KOTAEMON_DEMO": "1", "DEBUG": "0", "LOG_LEVEL": "WARNING", "ACCESS_LOG_LEVEL": "WARNING",
                 "CHAT_RATE_LIMIT": "1000000/min", "API_RATE_LIMIT": "1000000/min", "PYTHONUNBUFFERED": "1",
                 "RETRIEVAL_CACHE_SECONDS": "0", "REDIS_URL": args.redis_url, "CELERY_TASK_ALWAYS_EAGER": "1",
                 "CACHE_KEY_PREFIX": f"bench{uuid.uuid4().hex[:6]}", "TURN_LEASE_SECONDS": args.lease,
                 "CLUSTER_RECONCILE_SECONDS": "1"})
    if args.database_url:
        base.update({"DATABASE_URL": args.database_url, "DB_CONN_MAX_AGE": "0"})
    report: dict = {"cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="kotaemon-bench-") as data_dir:
        env = dict(base, KOTAEMON_DATA_DIR=data_dir)
        print("== preparing (migrate, demo knowledge base)", flush=True)
        key = prepare(env)
        print("== token path", flush=True)
        report["token_path"] = token_path(env, args.tokens)
        print("   ", report["token_path"], flush=True)
        from tests.conversations.slow_llm import SlowLLM

        # A streaming model (20 ms per word), so the first token is not the whole answer: the extractive
        # answerer produces its text at once after retrieval.
        llm = SlowLLM(delay=0.02, words=30)
        llm_env = {"GENERATOR": "openai", "LLM_BASE_URL": llm.base_url, "LLM_MODEL": "bench"}
        try:
            for label, extra in (("memory log", {"TURN_STREAM_BACKEND": "memory"}), ("redis log", {})):
                print(f"== first tokens ({label})", flush=True)
                server = Server(dict(env, **extra, **llm_env))
                try:
                    warm_up(server.addr, key)
                    report[f"first_tokens {label}"] = first_tokens(server.addr, key, args.turns)
                    print("   ", report[f"first_tokens {label}"], flush=True)
                finally:
                    server.stop()
        finally:
            llm.stop()
        if args.takeovers:
            print("== takeover after kill -9", flush=True)
            report["takeover"] = takeover(env, key, args.takeovers, args.delay)
    print("RESULT " + json.dumps(report))
    print_markdown(report, args)


def print_markdown(report: dict, args) -> None:
    print("\n| token path | µs/token wall | µs/token CPU |\n|---|---|---|")
    for label, r in report["token_path"].items():
        print(f"| {label} | {r['us_per_token_wall']:.1f} | {r['us_per_token_cpu']:.1f} |")
    print("\n| log | channel | turns | first token p50 ms | p95 ms | answer p50 ms | p95 ms |\n|---|---|---|---|---|---|---|")
    for key, value in report.items():
        if key.startswith("first_tokens"):
            for channel, r in value.items():
                print(f"| {key.split(' ', 1)[1]} | {channel} | {r['turns']} | {r['ttft_p50_ms']:.1f} | "
                      f"{r['ttft_p95_ms']:.1f} | {r['answer_p50_ms']:.1f} | {r['answer_p95_ms']:.1f} |")
    if report.get("takeover"):
        t = report["takeover"]
        print(f"\nTakeover (lease {args.lease} s, model {args.delay} s/word, {len(t)} kills):")
        for name in ("kill_to_first_event_s", "kill_to_first_new_token_s", "kill_to_answer_s", "gap_s"):
            values = [r[name] for r in t]
            print(f"  {name}: min {min(values):.2f} / median {pct(values, 50):.2f} / max {max(values):.2f}")
        print(f"  complete and exact: {sum(r['complete_and_exact'] for r in t)}/{len(t)}")


if __name__ == "__main__":
    main()
