"""Per-process cluster runtime: event listener, heartbeat, reconciliation, readiness.

Each ASGI server process starts one runtime from the ASGI lifespan (`ClusterLifespan` in
kotaemon_site/asgi.py); Celery worker processes start one from a worker signal (see `connect_celery`).
The runtime is three daemon threads, independent of the server's event loop, so a slow handler
(loading an index) never stalls requests:

- listener: its own asyncio loop and its own channel-layer instance (channels-redis refuses two event
  loops receiving on one layer object, and the server's websocket consumers use the shared one); joins
  CLUSTER_GROUP and hands every event to the events thread;
- events: one thread applies events, warm-ups and reconciliation in order, so handlers for one process
  never race each other;
- heartbeat: writes the instance record to the registry every CLUSTER_HEARTBEAT_SECONDS and schedules
  a reconciliation every CLUSTER_RECONCILE_SECONDS (journal replay + the apps' own checks against the
  database). That reconciliation is what bounds staleness when an event is lost.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Callable

from django.conf import settings

from . import events, registry

logger = logging.getLogger(__name__)

Warmup = Callable[[], None]
Reconciler = Callable[[], None]
InfoProvider = Callable[[], Any]

_warmups: dict[str, Warmup] = {}
_reconcilers: dict[str, tuple[Reconciler, tuple[str, ...]]] = {}
_info: dict[str, InfoProvider] = {}

_STOP = {"type": "cluster.stop"}


def register_warmup(name: str, function: Warmup) -> None:
    """Run `function` once when a web instance starts, before /readyz reports ready (e.g. load the active
    indexes). It raises to say "not ready yet"; it is retried every reconciliation until it succeeds."""
    _warmups[name] = function


def register_reconciler(name: str, function: Reconciler, *, kinds: tuple[str, ...] = ("web", "worker")) -> None:
    """Run `function` every CLUSTER_RECONCILE_SECONDS on the events thread of the processes of `kinds`:
    compare what this process holds with the authoritative state (the database) and heal. Must be cheap
    and idempotent."""
    _reconcilers[name] = (function, tuple(kinds))


def register_info(name: str, function: InfoProvider) -> None:
    """Add a field to this instance's registry record (e.g. "indexes", "plugin_config_version")."""
    _info[name] = function


# --- defaults for the other apps' state, looked up lazily --------------------------------------
# The knowledge and plugins apps own their state; these read it if the modules exist, so the core app
# does not import them at start-up and works without them.
def _attr(module_name: str, *path: str) -> Any:
    import importlib

    try:
        value: Any = importlib.import_module(module_name)
    except ImportError:
        return None
    for name in path:
        value = getattr(value, name, None)
        if value is None:
            return None
    return value


def _call_first(module_name: str, names: tuple[str, ...]) -> Any:
    for name in names:
        function = _attr(module_name, *name.split("."))
        if callable(function):
            return function()
    return None


def _default_indexes() -> Any:
    held = _call_first("apps.knowledge.index_registry",
                       ("registry.held_versions", "held_versions", "loaded_versions"))
    if held is None:
        held = events.held_versions("knowledge_updated")
    return {str(k): v for k, v in dict(held).items()}


def _default_plugin_config_version() -> Any:
    value = _call_first("apps.plugins.registry", ("registry.config_version", "config_version",
                                                  "plugin_config_version", "current_version"))
    if value is None:
        held = events.held_versions("plugin_config_updated")
        value = max(held.values()) if held else None
    return value


def _knowledge_registry() -> Any:
    registry_ = _attr("apps.knowledge.index_registry", "registry")
    if registry_ is None or not all(hasattr(registry_, n) for n in ("active_versions", "bundle", "held_versions")):
        return None
    return registry_


def _load_active_indexes() -> None:
    """Warm-up: load every active index version before the instance reports ready."""
    registry_ = _knowledge_registry()
    if registry_ is None:
        return
    if hasattr(registry_, "warm_up"):
        # Loads what fits the memory budget; a base whose index cannot be loaded degrades alone (its searches
        # answer index_unavailable) and never holds the whole instance out of readiness.
        registry_.warm_up()
        return
    missing = []
    for kb_id, active in registry_.active_versions(refresh=True).items():
        bundle = registry_.bundle(kb_id)
        if bundle is None or getattr(bundle, "version", active.version) < active.version:
            missing.append(f"{kb_id}:v{active.version}")
    if missing:
        raise RuntimeError(f"index versions not loadable yet: {', '.join(missing)}")


def _refresh_held_indexes() -> None:
    """Reconciler: swap in newer active versions of the indexes this process holds, before a request
    has to (the registry would also do it lazily on the next search, within its version-check bound)."""
    registry_ = _knowledge_registry()
    if registry_ is None:
        return
    held = registry_.held_versions()
    for kb_id, active in registry_.active_versions().items():
        if kb_id in held and held[kb_id] < active.version:
            registry_.bundle(kb_id)


register_warmup("indexes", _load_active_indexes)
register_reconciler("indexes", _refresh_held_indexes)


# --- process identity ---------------------------------------------------------------------------
def _argv_port(argv: list[str]) -> int | None:
    """The port a server was started with: uvicorn/daphne --port/-p, gunicorn --bind/-b host:port."""
    for i, arg in enumerate(argv):
        value = None
        if arg in ("--port", "-p", "--bind", "-b") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--port=") or arg.startswith("--bind="):
            value = arg.split("=", 1)[1]
        if value:
            value = value.rsplit(":", 1)[-1]
            if value.isdigit():
                return int(value)
    return None


class ClusterRuntime:
    def __init__(self, *, kind: str) -> None:
        self.kind = kind
        self.instance_id: str = settings.INSTANCE_ID
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.port: int | None = settings.CLUSTER_ADVERTISE_PORT or _argv_port(sys.argv)
        self.started = time.time()
        self.subscribed = False
        self.warm: dict[str, bool] = {name: False for name in self._warmup_names()}
        self.warmup_errors: dict[str, str] = {}
        self.heartbeat_ok = False
        self.heals = 0
        self._stopping = threading.Event()
        self._beat_now = threading.Event()  # a state change (subscribed, ready) is published at once
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cluster-events")
        self._reconcile_pending = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._layer: Any = None
        self._channel: str | None = None

    def _warmup_names(self) -> list[str]:
        return list(_warmups) if self.kind == "web" else []

    # lifecycle -----------------------------------------------------------------------------------
    @staticmethod
    def _preimport() -> None:
        """Import on this thread what the runtime's threads will import. Two threads importing one package
        at once can be handed a partially initialised module (redis imports redis.asyncio, which imports
        redis: "module 'redis' has no attribute 'Redis'" in the listener)."""
        import importlib

        names = ["redis", "apps.knowledge.index_registry", "apps.plugins.registry"]
        backend = settings.CHANNEL_LAYERS.get("default", {}).get("BACKEND", "")
        if backend:
            names.append(backend.rsplit(".", 1)[0])
        for name in names:
            try:
                importlib.import_module(name)
            except ImportError:
                pass

    def start(self) -> None:
        self._preimport()
        self._executor.submit(self._warmup)
        if settings.CLUSTER_LISTENER and self._layer_is_shared():
            self._spawn("cluster-listener", self._listen_thread)
        self._spawn("cluster-heartbeat", self._heartbeat_thread)
        logger.info("cluster runtime started", extra={"kind": self.kind, "port": self.port})

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._beat_now.set()
        if self._loop is not None and self._layer is not None and self._channel is not None:
            try:  # wake the listener's receive() so it can leave the group cleanly
                asyncio.run_coroutine_threadsafe(self._layer.send(self._channel, _STOP), self._loop).result(timeout)
            except Exception:
                pass
        for thread in self._threads:
            thread.join(timeout)
        from django.db import connections

        # The events thread's database connection must not outlive the runtime (a test database, or a
        # PostgreSQL server counting connections, would see it until the process exits).
        try:
            self._executor.submit(connections.close_all).result(timeout)
        except Exception:
            pass
        self._executor.shutdown(wait=False, cancel_futures=True)
        try:
            registry.deregister(self.instance_id)
        except Exception:
            logger.warning("cluster deregistration failed", exc_info=True)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    @staticmethod
    def _layer_is_shared() -> bool:
        """Only a shared (Redis) layer connects processes; the in-memory one cannot reach anyone."""
        backend = settings.CHANNEL_LAYERS.get("default", {}).get("BACKEND", "")
        return "InMemory" not in backend

    # state ---------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return all(self.warm.values())

    def readiness(self) -> tuple[bool, str]:
        if self.ready:
            return True, "loaded: " + (", ".join(sorted(self.warm)) or "nothing to load")
        waiting = sorted(name for name, done in self.warm.items() if not done)
        errors = "; ".join(f"{n}: {self.warmup_errors[n]}" for n in waiting if n in self.warmup_errors)
        return False, f"loading: {', '.join(waiting)}" + (f" ({errors})" if errors else "")

    def record(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        providers = {"indexes": _default_indexes, "plugin_config_version": _default_plugin_config_version} | _info
        for name, provider in providers.items():
            try:
                info[name] = provider()
            except Exception as exc:  # one broken provider must not stop the heartbeat
                info[name] = f"error: {exc.__class__.__name__}"
        return {
            "id": self.instance_id, "kind": self.kind, "host": self.host, "port": self.port, "pid": self.pid,
            "started": self.started, "ready": self.ready, "subscribed": self.subscribed, "channel": self._channel,
            "last_event": events.last_event(), "last_events": events.last_events(), "events": events.stats(),
            "heals": self.heals, **info,
        }

    # events thread jobs --------------------------------------------------------------------------
    def _run_job(self, job: Callable[[], Any]) -> Any:
        from django.db import close_old_connections

        close_old_connections()
        try:
            return job()
        finally:
            close_old_connections()

    def _warmup(self) -> None:
        for name in self._warmup_names():
            if self.warm.get(name):
                continue
            try:
                self._run_job(_warmups[name])
                self.warm[name] = True
                self.warmup_errors.pop(name, None)
                self._beat_now.set()
            except Exception as exc:
                self.warmup_errors[name] = f"{exc.__class__.__name__}: {exc}"[:200]
                logger.warning("cluster warm-up %s failed; retrying", name, exc_info=True)

    def _handle(self, event: Any) -> None:
        self._run_job(lambda: events.dispatch_outcome(event, remote=True))

    def reconcile(self) -> int:
        """Replay journal entries newer than what this process holds, then run the apps' reconcilers.
        Returns how many events were applied by the replay."""
        healed = 0
        try:
            healed = replay_journal()
        except Exception:
            logger.warning("cluster journal replay failed", exc_info=True)
        for name, (function, kinds) in list(_reconcilers.items()):
            if self.kind not in kinds:
                continue
            try:
                self._run_job(function)
            except Exception:
                logger.warning("cluster reconciler %s failed", name, exc_info=True)
        if not self.ready:
            self._warmup()
        self.heals += healed
        return healed

    def _reconcile_job(self) -> None:
        try:
            self._run_job(self.reconcile)
        finally:
            self._reconcile_pending.clear()

    # threads -------------------------------------------------------------------------------------
    def _heartbeat_thread(self) -> None:
        from django.db import connections

        try:
            self._heartbeat_loop()
        finally:
            connections.close_all()

    def _heartbeat_loop(self) -> None:
        from django.db import close_old_connections

        interval = max(0.05, float(settings.CLUSTER_HEARTBEAT_SECONDS))
        reconcile_every = max(0.05, float(settings.CLUSTER_RECONCILE_SECONDS))
        next_beat = next_reconcile = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + interval
                try:
                    registry.heartbeat(self.record())
                    if not self.heartbeat_ok:
                        logger.info("cluster heartbeat ok")
                    self.heartbeat_ok = True
                except Exception:
                    if self.heartbeat_ok:  # log the transition, not every beat while Redis is down
                        logger.warning("cluster heartbeat failed", exc_info=True)
                    self.heartbeat_ok = False
                finally:
                    close_old_connections()
            if now >= next_reconcile and not self._reconcile_pending.is_set():
                next_reconcile = now + reconcile_every
                self._reconcile_pending.set()
                try:
                    self._executor.submit(self._reconcile_job)
                except RuntimeError:  # executor shut down: we are stopping
                    return
            if self._beat_now.wait(max(0.01, min(next_beat, next_reconcile) - time.monotonic())):
                self._beat_now.clear()
                next_beat = 0.0

    def _listen_thread(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._listen())
        except Exception:
            logger.exception("cluster listener stopped")
        finally:
            self.subscribed = False
            loop.close()

    async def _listen(self) -> None:
        from channels.layers import channel_layers

        backoff = 0.2
        refresh = max(1.0, float(settings.CLUSTER_HEARTBEAT_SECONDS))
        while not self._stopping.is_set():
            layer = self._layer = channel_layers.make_backend("default")
            refresher: asyncio.Task | None = None
            try:
                channel = await layer.new_channel("cluster")
                await layer.group_add(events.CLUSTER_GROUP, channel)
                self._channel = channel
                self.subscribed = True
                self._beat_now.set()
                backoff = 0.2
                logger.info("cluster listener subscribed", extra={"channel": channel})
                refresher = asyncio.ensure_future(self._refresh_membership(layer, channel, refresh))
                while not self._stopping.is_set():
                    message = await layer.receive(channel)
                    if message.get("type") == "cluster.stop":
                        break
                    if message.get("type") != "cluster.event":
                        continue
                    try:
                        self._executor.submit(self._handle, message.get("event"))
                    except RuntimeError:
                        return
                await layer.group_discard(events.CLUSTER_GROUP, channel)
            except Exception:
                self.subscribed = False
                logger.warning("cluster listener lost the channel layer; reconnecting in %.1fs", backoff,
                               exc_info=True)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if refresher is not None:
                    refresher.cancel()
                try:
                    await layer.close_pools()
                except Exception:
                    pass

    async def _refresh_membership(self, layer: Any, channel: str, every: float) -> None:
        """Re-join periodically: group membership expires (channels-redis group_expiry), and a flushed
        Redis forgets it; re-adding is idempotent."""
        while True:
            await asyncio.sleep(every)
            try:
                await layer.group_add(events.CLUSTER_GROUP, channel)
            except Exception:
                logger.debug("cluster group refresh failed", exc_info=True)


# A journal entry younger than this is left for the next round: its broadcast is normally still on the
# way (the journal is written just before it), and replaying it now would only race the broadcast.
JOURNAL_GRACE_SECONDS = 0.5


def replay_journal() -> int:
    """Apply journal entries this process has not applied (newer version than held, or an unseen id)."""
    healed = 0
    horizon = time.time() - JOURNAL_GRACE_SECONDS
    for entry in registry.journal_entries():
        if isinstance(entry.get("ts"), (int, float)) and entry["ts"] > horizon:
            continue
        try:
            entry = events.validate_event(entry)
        except events.InvalidEvent:
            continue
        held = events.held_version(entry["type"], events.event_key(entry))
        if entry["version"] is not None and held is not None and entry["version"] <= held:
            continue
        if events.seen(entry["id"]):  # handled already (unversioned events stay in the journal)
            continue
        if events.dispatch_outcome(entry) == "applied":
            healed += 1
            logger.info("cluster event healed from the journal",
                        extra={"event_type": entry["type"], "event_id": entry["id"]})
    return healed


# --- process-wide runtime ------------------------------------------------------------------------
_runtime: ClusterRuntime | None = None
_runtime_lock = threading.Lock()


def current() -> ClusterRuntime | None:
    return _runtime


def start(*, kind: str) -> ClusterRuntime:
    """Start this process's runtime once (idempotent)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = ClusterRuntime(kind=kind)
            _runtime.start()
        return _runtime


def stop() -> None:
    global _runtime
    with _runtime_lock:
        runtime, _runtime = _runtime, None
    if runtime is not None and runtime.pid == os.getpid():
        runtime.stop()


_inline_lock = threading.Lock()
_inline_warm: dict[str, bool] = {}


def readiness() -> tuple[bool, str]:
    """(ready, detail) for /readyz. A server answers from its runtime's warm-up state; a process without
    a runtime (tests, a server run without lifespan) runs the warm-ups inline the first time."""
    runtime = current()
    if runtime is not None:
        return runtime.readiness()
    with _inline_lock:
        failures = []
        for name, function in list(_warmups.items()):
            if _inline_warm.get(name):
                continue
            try:
                function()
                _inline_warm[name] = True
            except Exception as exc:
                failures.append(f"{name}: {exc.__class__.__name__}: {exc}"[:200])
        if failures:
            return False, "loading: " + "; ".join(failures)
        return True, "loaded: " + (", ".join(sorted(_warmups)) or "nothing to load")


# --- ASGI lifespan ---------------------------------------------------------------------------------
class ClusterLifespan:
    """Wraps the ASGI application: starts the runtime on lifespan startup, stops it on shutdown.

    Lifespan rather than "start on first request": the instance subscribes and warms up before the
    load balancer sends it anything, and shutdown leaves the group and the registry cleanly. uvicorn
    (our entry point) runs lifespan by default; a server without lifespan still works correctly and
    heals through the readiness warm-up and the other instances' journal, just without the listener.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        runtime = current()
        if runtime is not None and runtime.port is None and scope.get("server"):
            runtime.port = scope["server"][1]
        if scope["type"] == "http" and settings.CLUSTER_INSTANCE_HEADER:
            # Which instance answered: lets operators (and the cluster test) see affinity at work.
            header = (b"x-instance-id", settings.INSTANCE_ID.encode("latin-1", "replace"))

            async def send_with_instance(message):
                if message["type"] == "http.response.start":
                    message = dict(message, headers=[*message.get("headers", []), header])
                await send(message)

            return await self.app(scope, receive, send_with_instance)
        return await self.app(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if settings.CLUSTER_RUNTIME:
                        await asyncio.to_thread(start, kind="web")
                except Exception as exc:
                    logger.exception("cluster runtime failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)[:200]})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await asyncio.to_thread(stop)
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return


# --- Celery ------------------------------------------------------------------------------------------
def connect_celery() -> None:
    """Start a worker runtime in each Celery process that executes tasks (prefork children after the
    fork; the main process for solo/threads pools), so workers heartbeat and receive events."""
    try:
        from celery import signals
    except ImportError:
        return

    @signals.worker_process_init.connect(weak=False)
    def _child_started(**_kwargs) -> None:
        if settings.CLUSTER_WORKER_RUNTIME:
            start(kind="worker")

    @signals.worker_ready.connect(weak=False)
    def _worker_ready(sender=None, **_kwargs) -> None:
        pool = getattr(getattr(sender, "controller", None), "pool_cls", None)
        name = getattr(pool, "__module__", "") + "." + getattr(pool, "__name__", str(pool))
        if settings.CLUSTER_WORKER_RUNTIME and "prefork" not in name:
            start(kind="worker")

    @signals.worker_process_shutdown.connect(weak=False)
    def _child_stopping(**_kwargs) -> None:
        stop()

    @signals.worker_shutdown.connect(weak=False)
    def _worker_stopping(**_kwargs) -> None:
        stop()
