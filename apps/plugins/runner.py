"""The sandbox runtime in the web process: warm worker processes per plugin, wall-clock timeouts.

Each enabled plugin gets its own small pool of long-lived worker processes (worker.py), so one
plugin never shares an interpreter with another plugin's code or secrets, and a plugin that hangs
or blows its memory limit loses only its own worker, which is killed and replaced. Workers are
started on first use and reused (start-up ~0.1-0.3 s; a warm call costs a pipe round trip).

Nothing here reads Django settings: services.py builds RuntimeOptions and PluginSpecs and supplies
the RPC handler that serves storage and ticket requests on the plugin's behalf.
"""
from __future__ import annotations

import atexit
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .worker import BOOT, MAX_FRAME, ProtocolError, _HEADER, write_frame

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
OUTCOMES = ("ok", "error", "timeout", "denied")


@dataclass(frozen=True)
class RuntimeOptions:
    plugins_dir: str | None
    dotted_paths: tuple[str, ...] = ()
    memory_limit_mb: int = 512
    denied_paths: tuple[str, ...] = ()
    start_timeout: float = 15.0
    pool_size: int = 2
    entry_points: bool = True
    builtins: bool = True
    python: str = sys.executable
    sys_path: tuple[str, ...] = ()   # extra import paths for workers (e.g. a `pip install --target` dir)
    on_spawn: Callable[[str], None] | None = field(default=None, compare=False, hash=False)


@dataclass(frozen=True)
class PluginSpec:
    """Everything a worker needs to run one plugin. `version` changes whenever any of it changes."""

    name: str
    source: str
    ref: str
    version: int
    config: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    scopes: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()


@dataclass
class CallOutcome:
    outcome: str                       # ok | error | timeout | denied
    duration: float = 0.0
    result: dict[str, Any] | None = None
    patch: dict[str, Any] = field(default_factory=dict)
    error_code: str | None = None
    error_message: str = ""


class RpcError(Exception):
    """Raised by an RPC handler; returned to the plugin, and a "denied" one marks the whole call."""

    def __init__(self, outcome: str, code: str, message: str) -> None:
        super().__init__(message)
        self.outcome, self.code, self.message = outcome, code, message


RpcHandler = Callable[[str, dict[str, Any]], Any]


class WorkerLost(Exception):
    def __init__(self, outcome: str, code: str, message: str) -> None:
        super().__init__(message)
        self.outcome, self.code, self.message = outcome, code, message


def _child_env(tmp_dir: str) -> dict[str, str]:
    # Built from nothing, not filtered from os.environ: a new secret variable can never leak by omission.
    return {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": tmp_dir, "TMPDIR": tmp_dir,
            "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


class WorkerProcess:
    """One sandbox worker and its pipe protocol. Not thread-safe: a pool lends it to one caller at a time."""

    def __init__(self, init: dict[str, Any], options: RuntimeOptions) -> None:
        self.tmp_dir = tempfile.mkdtemp(prefix="kotaemon-plugin-")
        self.version: int | None = None
        self.buffer = bytearray()
        try:
            self.proc = subprocess.Popen(
                [options.python, "-I", "-c", BOOT, str(ROOT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=None, cwd=self.tmp_dir, env=_child_env(self.tmp_dir), close_fds=True,
            )
        except OSError as exc:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            raise WorkerLost("error", "worker_start_failed", f"could not start a plugin worker: {exc}") from None
        self.started = time.monotonic()
        init = dict(init, memory_limit_mb=options.memory_limit_mb, denied_paths=list(options.denied_paths),
                    sys_path=list(options.sys_path), plugins_dir=options.plugins_dir)
        try:
            write_frame(self.proc.stdin, init)
        except (OSError, ValueError) as exc:
            self.kill()
            raise WorkerLost("error", "worker_start_failed", f"the plugin worker died at start: {exc}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def read(self, deadline: float) -> dict[str, Any]:
        import json

        fd = self.proc.stdout.fileno()
        while True:
            if len(self.buffer) >= _HEADER.size:
                (length,) = _HEADER.unpack(self.buffer[:_HEADER.size])
                if length > MAX_FRAME:
                    raise WorkerLost("error", "protocol_error", f"worker sent a frame of {length} bytes")
                if len(self.buffer) >= _HEADER.size + length:
                    data = bytes(self.buffer[_HEADER.size:_HEADER.size + length])
                    del self.buffer[:_HEADER.size + length]
                    try:
                        return json.loads(data)
                    except ValueError as exc:
                        raise WorkerLost("error", "protocol_error", f"worker sent invalid JSON: {exc}") from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerLost("timeout", "timeout", "the plugin did not answer in time")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                code = self.proc.wait(timeout=5)
                raise WorkerLost("error", "worker_crashed", f"the worker process exited (status {code})")
            self.buffer.extend(chunk)

    def send(self, message: dict[str, Any]) -> None:
        try:
            write_frame(self.proc.stdin, message)
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise WorkerLost("error", "worker_crashed", f"the worker process is gone: {exc}") from None
        except ProtocolError as exc:
            raise WorkerLost("error", "request_too_large", str(exc)) from None

    def exchange(self, message: dict[str, Any], deadline: float, rpc: RpcHandler | None) -> dict[str, Any]:
        """Send a request, serve the worker's RPCs until it answers "done". RPC denials override the outcome."""
        self.send(message)
        denied: dict[str, str] | None = None
        while True:
            frame = self.read(deadline)
            op = frame.get("op")
            if op == "done":
                if denied is not None:
                    frame = {"op": "done", "outcome": "denied", "error": denied, "result": None, "patch": {}}
                return frame
            if op != "rpc":
                raise WorkerLost("error", "protocol_error", f"unexpected frame {op!r}")
            try:
                if rpc is None:
                    raise RpcError("denied", "rpc_not_available", "no platform services during this call")
                value = rpc(str(frame.get("method")), dict(frame.get("args") or {}))
                reply = {"op": "rpc_result", "value": value}
            except RpcError as exc:
                if exc.outcome == "denied" and denied is None:
                    denied = {"code": exc.code, "message": exc.message}
                reply = {"op": "rpc_error", "outcome": exc.outcome, "code": exc.code, "message": exc.message}
            except Exception:  # noqa: BLE001 - a platform-side failure is the plugin's error, not a 500
                logger.exception("plugin rpc failed", extra={"method": frame.get("method")})
                reply = {"op": "rpc_error", "outcome": "error", "code": "platform_error",
                         "message": "the platform could not serve this request"}
            self.send(reply)

    def kill(self) -> None:
        if self.alive():
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.error("plugin worker did not die", extra={"pid": self.pid})
        self._cleanup()

    def close(self, timeout: float = 3.0, rpc: RpcHandler | None = None) -> None:
        """Graceful: the worker tears its plugin instance down, then exits; killed if it dawdles."""
        if self.alive():
            try:
                self.exchange({"op": "shutdown"}, time.monotonic() + timeout, rpc)
                self.proc.wait(timeout=timeout)
            except (WorkerLost, subprocess.TimeoutExpired):
                pass
        self.kill()

    def _cleanup(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


class PluginPool:
    """Warm workers for one plugin (one source/ref). Up to `size` calls run at once."""

    def __init__(self, name: str, source: str, ref: str, options: RuntimeOptions) -> None:
        self.name, self.source, self.ref, self.options = name, source, ref, options
        self.idle: list[WorkerProcess] = []
        self.count = 0
        self.closed = False
        self.cond = threading.Condition()
        self.spawned = 0

    def _spawn(self) -> WorkerProcess:
        worker = WorkerProcess({"mode": "plugin", "plugin": {"name": self.name, "source": self.source,
                                                             "ref": self.ref}}, self.options)
        self.spawned += 1
        try:
            frame = worker.read(time.monotonic() + self.options.start_timeout)
        except WorkerLost as exc:
            worker.kill()
            if exc.outcome == "timeout":
                raise WorkerLost("timeout", "worker_start_timeout",
                                 f"the plugin's worker did not start within {self.options.start_timeout}s") from None
            raise
        if frame.get("op") != "ready":
            worker.kill()
            error = frame.get("error") or {}
            raise WorkerLost("error", "plugin_load_failed", error.get("message") or "the plugin failed to load")
        if self.options.on_spawn:
            self.options.on_spawn(self.name)
        return worker

    def acquire(self, deadline: float) -> WorkerProcess:
        with self.cond:
            while True:
                if self.closed:
                    raise WorkerLost("error", "plugin_unloaded", "the plugin was unloaded")
                while self.idle:
                    worker = self.idle.pop()
                    if worker.alive():
                        return worker
                    self.count -= 1
                    worker.kill()
                if self.count < self.options.pool_size:
                    self.count += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkerLost("timeout", "pool_busy", "every worker of this plugin stayed busy")
                self.cond.wait(remaining)
        try:
            return self._spawn()
        except BaseException:
            with self.cond:
                self.count -= 1
                self.cond.notify()
            raise

    def release(self, worker: WorkerProcess, healthy: bool) -> None:
        with self.cond:
            keep = healthy and worker.alive() and not self.closed
            if keep:
                self.idle.append(worker)
            else:
                self.count -= 1
            self.cond.notify()
        if not keep:
            threading.Thread(target=worker.close if healthy else worker.kill, daemon=True).start()
            if not healthy:
                # Replace a killed or crashed worker now, so the next call does not pay a cold start.
                threading.Thread(target=self._replenish, daemon=True).start()

    def _replenish(self) -> None:
        with self.cond:
            if self.closed or self.idle or self.count >= self.options.pool_size:
                return
            self.count += 1
        try:
            worker = self._spawn()
        except Exception:  # noqa: BLE001 - the next call reports start-up failures itself
            with self.cond:
                self.count -= 1
                self.cond.notify()
            return
        with self.cond:
            if not self.closed:
                self.idle.append(worker)
                self.cond.notify()
                return
            self.count -= 1
        worker.kill()

    def call(self, spec: PluginSpec, message: dict[str, Any], timeout: float, rpc: RpcHandler | None) -> CallOutcome:
        started = time.monotonic()
        healthy = False
        worker: WorkerProcess | None = None
        try:
            # Start-up of a cold worker is bounded by start_timeout; the call's own clock starts when
            # a worker is ready, so a cold start does not eat the plugin's time budget.
            worker = self.acquire(started + max(timeout, self.options.start_timeout))
            deadline = time.monotonic() + timeout
            if worker.version != spec.version:
                reply = worker.exchange({"op": "setup", "config": spec.config, "scopes": list(spec.scopes),
                                         "allowed_hosts": list(spec.allowed_hosts), "version": spec.version},
                                        deadline, rpc)
                if reply.get("outcome") != "ok":
                    healthy = not reply.get("recycle")
                    error = reply.get("error") or {}
                    worker.version = None
                    return CallOutcome(reply.get("outcome", "error"), time.monotonic() - started,
                                       error_code=error.get("code", "setup_failed"),
                                       error_message="setup failed: " + error.get("message", ""))
                worker.version = spec.version
            reply = worker.exchange(message, deadline, rpc)
            healthy = not reply.get("recycle")
            error = reply.get("error") or {}
            outcome = reply.get("outcome") if reply.get("outcome") in OUTCOMES else "error"
            return CallOutcome(outcome, time.monotonic() - started, result=reply.get("result"),
                               patch=reply.get("patch") or {}, error_code=error.get("code"),
                               error_message=error.get("message", ""))
        except WorkerLost as exc:
            return CallOutcome(exc.outcome, time.monotonic() - started, error_code=exc.code, error_message=exc.message)
        finally:
            if worker is not None:
                self.release(worker, healthy)

    def reconfigure(self, spec: PluginSpec, timeout: float, rpc: RpcHandler | None) -> None:
        """Tear down the old instance and set up the new one in every idle worker now (busy ones catch up
        on their next call, which sees the new version)."""
        with self.cond:
            workers, self.idle = self.idle, []
        for worker in workers:
            ok = False
            try:
                reply = worker.exchange({"op": "setup", "config": spec.config, "scopes": list(spec.scopes),
                                         "allowed_hosts": list(spec.allowed_hosts), "version": spec.version},
                                        time.monotonic() + timeout, rpc)
                ok = reply.get("outcome") == "ok" and not reply.get("recycle")
                worker.version = spec.version if ok else None
            except WorkerLost:
                ok = False
            self.release(worker, ok)

    def close(self, rpc: RpcHandler | None = None) -> None:
        with self.cond:
            self.closed = True
            workers, self.idle = self.idle, []
            self.count -= len(workers)
            self.cond.notify_all()
        for worker in workers:
            worker.close(rpc=rpc)


@dataclass
class Catalogue:
    plugins: dict[str, dict[str, Any]]
    errors: list[dict[str, str]]
    discovered_at: float


_runtimes: "weakref.WeakSet[PluginRuntime]" = weakref.WeakSet()
_generations = iter(range(1, 1 << 62))


class PluginRuntime:
    def __init__(self, options: RuntimeOptions) -> None:
        self.options = options
        self.pools: dict[str, PluginPool] = {}
        self.lock = threading.Lock()
        self.generation = next(_generations)
        _runtimes.add(self)

    def discover(self) -> Catalogue:
        """Import every plugin in a throwaway worker and describe them (the web process imports none).

        A module whose import hangs past start_timeout is reported as a load error and discovery runs
        again without it, so one bad module never hides the others.
        """
        skip: list[str] = []
        hung: list[dict[str, str]] = []
        for _ in range(20):
            try:
                worker = WorkerProcess({"mode": "discover", "plugins_dir": self.options.plugins_dir,
                                        "dotted_paths": list(self.options.dotted_paths), "skip": skip,
                                        "entry_points": self.options.entry_points,
                                        "builtins": self.options.builtins}, self.options)
            except WorkerLost as exc:
                return Catalogue({}, hung + [{"source": "discovery", "ref": str(self.options.plugins_dir),
                                              "error": exc.message}], time.time())
            current: dict[str, str] | None = None
            try:
                while True:
                    frame = worker.read(time.monotonic() + self.options.start_timeout)
                    if frame.get("op") == "importing":
                        current = {"source": frame.get("source", ""), "ref": frame.get("ref", "")}
                        continue
                    break
            except WorkerLost as exc:
                if current is None:
                    return Catalogue({}, hung + [{"source": "discovery", "ref": str(self.options.plugins_dir),
                                                  "error": f"plugin discovery failed: {exc.message}"}], time.time())
                what = "did not finish importing within" if exc.outcome == "timeout" else "crashed the interpreter in"
                hung.append(current | {"error": f"import {what} {self.options.start_timeout}s"
                                                if exc.outcome == "timeout" else f"import {what} ({exc.message})"})
                skip.append(current["ref"])
                continue
            finally:
                worker.kill()
            plugins = {p["name"]: p for p in frame.get("plugins", [])}
            return Catalogue(plugins, hung + list(frame.get("errors", [])), time.time())
        return Catalogue({}, hung, time.time())

    def pool(self, spec: PluginSpec) -> PluginPool:
        with self.lock:
            pool = self.pools.get(spec.name)
            if pool is not None and (pool.source, pool.ref) != (spec.source, spec.ref):
                self.pools.pop(spec.name)
                threading.Thread(target=pool.close, daemon=True).start()
                pool = None
            if pool is None:
                pool = self.pools[spec.name] = PluginPool(spec.name, spec.source, spec.ref, self.options)
            return pool

    def call(self, spec: PluginSpec, message: dict[str, Any], *, timeout: float,
             rpc: RpcHandler | None = None) -> CallOutcome:
        return self.pool(spec).call(spec, message, timeout, rpc)

    def apply(self, specs: dict[str, PluginSpec], *, timeout: float,
              rpc_for: Callable[[PluginSpec], RpcHandler | None]) -> None:
        """Bring running pools in line with the enabled plugins: retire the others, reconfigure changed ones."""
        with self.lock:
            retired = [self.pools.pop(name) for name in list(self.pools)
                       if name not in specs or (self.pools[name].source, self.pools[name].ref)
                       != (specs[name].source, specs[name].ref)]
            live = [(self.pools[name], specs[name]) for name in self.pools]
        for pool in retired:
            pool.close(rpc=rpc_for(PluginSpec(pool.name, pool.source, pool.ref, -1)))
        for pool, spec in live:
            if any(w.version != spec.version for w in list(pool.idle)):
                pool.reconfigure(spec, timeout, rpc_for(spec))

    def worker_pids(self) -> dict[str, list[int]]:
        with self.lock:
            return {name: [w.pid for w in pool.idle] for name, pool in self.pools.items()}

    def shutdown(self, rpc_for: Callable[[str], RpcHandler | None] | None = None) -> None:
        with self.lock:
            pools, self.pools = list(self.pools.values()), {}
        for pool in pools:
            pool.close(rpc=rpc_for(pool.name) if rpc_for else None)


@atexit.register
def _shutdown_all() -> None:
    for runtime in list(_runtimes):
        try:
            runtime.shutdown()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
