"""Warm plugin call round trip before and after the bubblewrap sandbox, measured side by side.

    .venv/bin/python benchmarks/plugin_sandbox_warm_call.py --before 0e34022 [--calls 300 --rounds 3]

`--before` is a commit of this repository (checked out into a temporary git worktree); each round
runs, in fresh processes and in turn: that commit's runtime (with its default sandbox), today's runtime
with PLUGIN_SANDBOX=none
and today's runtime with bubblewrap. Each variant starts a runtime, calls a trivial hook once (cold:
worker start + import + setup) and then `--calls` times (warm); wall and CPU time of the web side
are reported. Results: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, statistics, sys, time, dataclasses
root, plugins, calls, sandbox = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, root)
from apps.plugins.runner import PluginRuntime, PluginSpec, RuntimeOptions
kw = {"plugins_dir": plugins, "entry_points": False, "pool_size": 1}
if "sandbox" in {f.name for f in dataclasses.fields(RuntimeOptions)}:
    kw["sandbox"] = sandbox
runtime = PluginRuntime(RuntimeOptions(**kw))
spec = PluginSpec("echo", "dir", plugins + "/echo.py", 1)
msg = {"op": "invoke", "stage": "intent", "method": "go", "intent": "echo", "slots": {},
       "user": {"id": 1, "username": "bench"}, "ctx": {"message": "hi"}}
t = time.perf_counter()
first = runtime.call(spec, msg, timeout=30)
cold = time.perf_counter() - t
assert first.outcome == "ok", first
warm, cpu0 = [], time.process_time()
for _ in range(calls):
    t = time.perf_counter()
    runtime.call(spec, msg, timeout=5)
    warm.append(time.perf_counter() - t)
cpu = (time.process_time() - cpu0) / calls
warm.sort()
runtime.shutdown()
print(json.dumps({"cold_ms": cold * 1000, "p50_ms": statistics.median(warm) * 1000,
                  "p95_ms": warm[int(0.95 * len(warm)) - 1] * 1000, "cpu_per_call_ms": cpu * 1000}))
'''


def run(root: Path, plugins: str, calls: int, sandbox: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), plugins, str(calls), sandbox],
                         capture_output=True, text=True, check=True, cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before],
                       check=True, capture_output=True)
        try:
            plugins = Path(tmp) / "plugins"
            plugins.mkdir()
            (plugins / "echo.py").write_text(textwrap.dedent("""
                from apps.plugins.base import BasePlugin, intent_hook
                class Echo(BasePlugin):
                    name = "echo"
                    @intent_hook(intent="echo", keywords=["echo"])
                    def go(self, ctx):
                        return "echo " + ctx.message
            """))
            # The before commit runs with its default sandbox (bubblewrap where it has one; a commit older than
            # the sandbox ignores the setting).
            variants = {f"before ({args.before})": (before, "bwrap"), "after, PLUGIN_SANDBOX=none": (ROOT, "none"),
                        "after, bubblewrap": (ROOT, "bwrap")}
            results: dict[str, list[dict]] = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, (root, sandbox) in variants.items():
                    results[name].append(run(root, str(plugins), args.calls, sandbox))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], capture_output=True)
    summary = {name: {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]}
               for name, rounds in results.items()}
    print(json.dumps({"calls": args.calls, "rounds": args.rounds, "median_of_rounds": summary}, indent=2))


if __name__ == "__main__":
    main()
