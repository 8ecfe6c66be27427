"""Celery task metrics and log context, from Celery's own signals (no change to any task).

- before_task_publish stamps each message with the publish time and the caller's request/session ids;
- task_prerun measures queue wait (publish -> start) and binds the ids for the task's log lines;
- task_postrun counts the outcome and the run time; task_revoked counts revocations.

Eager tasks (the embedded default) never pass through the broker: they count outcomes and run time
but no queue wait, and keep the request context of the caller they run in.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery import signals

from apps.core.logging import actor_var, request_id_var, session_id_var

from .metrics import REGISTRY, celery_queue_wait_seconds, celery_task_duration_seconds, celery_tasks_total

logger = logging.getLogger(__name__)

PUBLISHED_AT = "kotaemon_published_at"
REQUEST_ID = "kotaemon_request_id"
SESSION_ID = "kotaemon_session_id"
ACTOR = "kotaemon_actor"

_running: dict[str, tuple[float, list]] = {}
_lock = threading.Lock()
_connected = False


def _task_name(sender: Any, task: Any = None) -> str:
    for candidate in (task, sender):
        name = getattr(candidate, "name", None)
        if name:
            return str(name)
    return str(sender) if isinstance(sender, str) else "unknown"


def _on_before_publish(sender=None, headers=None, **_kwargs) -> None:
    if headers is None:  # protocol 1 messages carry no headers dict; nothing to stamp
        return
    headers.setdefault(PUBLISHED_AT, time.time())
    if request_id_var.get() != "-":
        headers.setdefault(REQUEST_ID, request_id_var.get())
    if session_id_var.get() != "-":
        headers.setdefault(SESSION_ID, session_id_var.get())
    # Who asked for the work: the audit log names them on what the task changes ("alice via task:...").
    try:
        from .audit import current_actor

        actor = current_actor()
        if actor.source in ("admin", "api", "web", "command") and actor.label != "anonymous":
            headers.setdefault(ACTOR, actor.label)
    except Exception:  # never block publishing on the audit context
        pass


def _on_prerun(sender=None, task_id=None, task=None, **_kwargs) -> None:
    name = _task_name(sender, task)
    request = getattr(task, "request", None)
    published_at = getattr(request, PUBLISHED_AT, None) if request is not None else None
    if isinstance(published_at, (int, float)):
        # Clocks of different machines disagree a little; a negative wait is a skew, not a wait.
        celery_queue_wait_seconds.labels(name).observe(max(0.0, time.time() - published_at))
    tokens: list = []
    request_id = getattr(request, REQUEST_ID, None) if request is not None else None
    if request_id:
        tokens.append((request_id_var, request_id_var.set(str(request_id))))
    elif request_id_var.get() == "-" and task_id:
        tokens.append((request_id_var, request_id_var.set(f"task-{task_id}")))
    session_id = getattr(request, SESSION_ID, None) if request is not None else None
    if session_id:
        tokens.append((session_id_var, session_id_var.set(str(session_id))))
    if actor_var.get() is None:
        requested_by = getattr(request, ACTOR, None) if request is not None else None
        label = f"{requested_by} via task:{name}" if requested_by else f"task:{name}"
        tokens.append((actor_var, actor_var.set(label)))
    with _lock:
        _running[task_id] = (time.perf_counter(), tokens)


def _on_postrun(sender=None, task_id=None, task=None, state=None, **_kwargs) -> None:
    name = _task_name(sender, task)
    with _lock:
        started, tokens = _running.pop(task_id, (None, []))
    # state is None when the task raised and the error propagated (eager mode): that is a failure.
    outcome = (state or "FAILURE").lower()
    celery_tasks_total.labels(name, outcome).inc()
    if started is not None:
        celery_task_duration_seconds.labels(name).observe(time.perf_counter() - started)
    for var, token in reversed(tokens):
        try:
            var.reset(token)
        except ValueError:  # set in another context (should not happen with prefork/solo/threads)
            pass


def _on_revoked(sender=None, request=None, terminated=False, expired=False, **_kwargs) -> None:
    name = _task_name(sender) if sender is not None else getattr(request, "task", "unknown")
    celery_tasks_total.labels(name, "expired" if expired else "revoked").inc()


def _on_rejected(message=None, **_kwargs) -> None:
    headers = getattr(message, "headers", None) or {}
    celery_tasks_total.labels(str(headers.get("task", "unknown")), "rejected").inc()


def _on_worker_init(sender=None, **_kwargs):
    """Serve the worker's metrics on WORKER_METRICS_PORT (Prometheus scrapes workers like instances).

    Prefork children record into their own memory: set PROMETHEUS_MULTIPROC_DIR (an empty directory,
    per worker) so their values are written to shared files and summed here; the solo and threads
    pools need nothing.
    """
    from django.conf import settings

    port = int(getattr(settings, "WORKER_METRICS_PORT", 0) or 0)
    if not port:
        return
    from prometheus_client import CollectorRegistry

    from .scrape import serve_metrics

    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    # The same scrape rule as the web /metrics (METRICS_TOKEN; closed by default in production).
    server = serve_metrics(port, getattr(settings, "WORKER_METRICS_ADDR", "0.0.0.0"), registry)
    logger.info("worker metrics on port %s", port, extra={"multiprocess": registry is not REGISTRY})
    return server


def _on_worker_process_shutdown(pid=None, **_kwargs) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())


def connect() -> None:
    """Idempotent: AppConfig.ready() may run more than once in tests."""
    global _connected
    if _connected:
        return
    signals.before_task_publish.connect(_on_before_publish, weak=False, dispatch_uid="kotaemon-monitoring-publish")
    signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid="kotaemon-monitoring-prerun")
    signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid="kotaemon-monitoring-postrun")
    signals.task_revoked.connect(_on_revoked, weak=False, dispatch_uid="kotaemon-monitoring-revoked")
    signals.task_rejected.connect(_on_rejected, weak=False, dispatch_uid="kotaemon-monitoring-rejected")
    signals.worker_init.connect(_on_worker_init, weak=False, dispatch_uid="kotaemon-monitoring-worker-init")
    signals.worker_process_shutdown.connect(_on_worker_process_shutdown, weak=False,
                                            dispatch_uid="kotaemon-monitoring-worker-shutdown")
    _connected = True
