"""Sandbox and router timings (not a test; numbers go to docs/plugins.md).

    .venv/bin/python tests/plugins/bench_plugins.py [--calls 300]

Runs without Django or a database: the runtime and the router are Django-free.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from apps.plugins.runner import PluginRuntime, PluginSpec, RuntimeOptions  # noqa: E402
from tests.plugins.order_service import order_service  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _http_rpc(host: str):
    """What the web process does for ctx.http (apps.plugins.services._plugin_http), without Django settings."""
    import base64

    from apps.core.outbound import fetch
    from apps.plugins.httpclient import host_allowed

    def rpc(method, args):
        assert method == "http.request", method
        resp = fetch(args["url"], method=args["verb"], headers=args.get("headers") or {}, timeout=3, max_bytes=2 << 20,
                     max_redirects=5, allow=["127.0.0.1"], host_filter=lambda h, p: host_allowed(h, p, [host]))
        return {"status": resp.status, "headers": resp.headers, "url": resp.url,
                "body": base64.b64encode(resp.content).decode()}

    return rpc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        plugins = Path(tmp) / "plugins"
        plugins.mkdir()
        # A module provides only the plugin named after it (identity comes from the platform).
        (plugins / "echo.py").write_text(textwrap.dedent("""
            from apps.plugins.base import BasePlugin, intent_hook
            class Echo(BasePlugin):
                name = "echo"
                @intent_hook(intent="echo", keywords=["echo"])
                def go(self, ctx):
                    return "echo " + ctx.message
        """))
        (plugins / "sleepy.py").write_text(textwrap.dedent("""
            import time
            from apps.plugins.base import BasePlugin, intent_hook
            class Sleepy(BasePlugin):
                name = "sleepy"
                @intent_hook(intent="sleepy", keywords=["sleepy"])
                def go(self, ctx):
                    time.sleep(60)
        """))
        runtime = PluginRuntime(RuntimeOptions(plugins_dir=str(plugins), entry_points=False, pool_size=1))
        t = time.perf_counter()
        catalogue = runtime.discover()
        out["discovery_ms"] = ms(time.perf_counter() - t)
        out["discovered"] = sorted(catalogue.plugins)
        msg = {"op": "invoke", "stage": "intent", "method": "go", "intent": "echo", "slots": {},
               "user": {"id": 1, "username": "bench"}, "ctx": {"message": "hi"}}
        echo = PluginSpec("echo", "dir", str(plugins / "echo.py"), 1)
        t = time.perf_counter()
        first = runtime.call(echo, msg, timeout=5)
        out["cold_call_ms"] = ms(time.perf_counter() - t)
        assert first.outcome == "ok", first
        warm = []
        for _ in range(args.calls):
            t = time.perf_counter()
            runtime.call(echo, msg, timeout=5)
            warm.append(time.perf_counter() - t)
        out["warm_call_ms"] = {"p50": ms(statistics.median(warm)), "p95": ms(pct(warm, 95)), "n": len(warm)}
        pid = runtime.worker_pids()["echo"][0]
        out["worker_rss_mb"] = rss_mb(pid)

        with order_service() as orders:
            spec = PluginSpec("order_query", "builtin", "apps.plugins.builtin.order_query", 1, config={
                "base_url": orders.url, "orders_path": "/users/{user}/orders", "order_path": "/x/{order_id}",
                "refunds_path": "/r", "user_key": "id", "max_orders": 3, "request_timeout_seconds": 3},
                scopes=("http",), allowed_hosts=(orders.url.split("//")[1],))
            order_msg = dict(msg, method="query_order", intent="query_order")
            http = _http_rpc(orders.url.split("//")[1])
            assert runtime.call(spec, order_msg, timeout=5, rpc=http).outcome == "ok"
            calls = []
            for _ in range(args.calls):
                t = time.perf_counter()
                runtime.call(spec, order_msg, timeout=5, rpc=http)
                calls.append(time.perf_counter() - t)
            out["order_query_warm_ms"] = {"p50": ms(statistics.median(calls)), "p95": ms(pct(calls, 95))}

        sleepy = PluginSpec("sleepy", "dir", str(plugins / "sleepy.py"), 1)
        runtime.call(sleepy, dict(msg, method="go"), timeout=0.01)  # start a worker (it is killed and replaced)
        time.sleep(1.0)  # the replacement starts in the background
        t = time.perf_counter()
        hung = runtime.call(sleepy, dict(msg, method="go"), timeout=0.5)
        out["timeout_0.5s_returns_after_ms"] = ms(time.perf_counter() - t)
        assert hung.outcome == "timeout", hung
        time.sleep(1.0)
        pool = runtime.pools["sleepy"]
        out["sleepy_workers_started (1 + a replacement per timeout)"] = pool.spawned
        runtime.shutdown()

    from apps.knowledge.rag.embedder import configure_threads, get_embedder
    from apps.plugins.discovery import discover
    from apps.plugins.router import IntentRouter, IntentSpec

    configure_threads(1)
    found, _ = discover(plugins_dir=str(ROOT / "plugins_local"), dotted_paths=[], entry_points=False)
    specs = [IntentSpec(f.cls.name, h.intent, h.method, h.priority, h.examples, h.keywords)
             for f in found for h in f.cls.hook_specs() if h.stage == "intent" and not h.configurable]
    embedder = get_embedder()
    t = time.perf_counter()
    embedder.encode(["load"])
    out["embedding_model_load_ms"] = ms(time.perf_counter() - t)
    router = IntentRouter(specs, encode=embedder.encode, threshold=0.40, margin=0.03, top_k=2)
    t = time.perf_counter()
    router.route("warm up")
    out["router_first_route_ms (embeds all examples)"] = ms(time.perf_counter() - t)
    data = json.loads((ROOT / "tests/plugins/data/router_heldout.json").read_text())
    texts = [u for k, v in data.items() if not k.startswith("_") for u in v]
    times = []
    for text in texts:
        t = time.perf_counter()
        router.route(text)
        times.append(time.perf_counter() - t)
    out["route_ms"] = {"p50": ms(statistics.median(times)), "p95": ms(pct(times, 95)), "n": len(times)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
