"""Core tasks, and the base class of every task: a cap on deliveries.

Why: tasks are acks_late with reject_on_worker_lost (a crash must not lose work), so a message whose task
kills its worker (out of memory, a segfault in a parser) goes back to the queue and kills the next worker,
for ever. Each delivery is counted in the cache (Redis in production) under the task id before the task
body runs, and forgotten once the body returns or raises; a task that never got that far on
CELERY_MAX_DELIVERIES deliveries is parked instead of run: a ParkedTask row (admin: Core > Parked tasks)
and an error log line, and the message is dropped. An operator fixes the cause and re-queues it.
"""
from __future__ import annotations

import logging

from celery import Task, shared_task
from celery.exceptions import Reject

logger = logging.getLogger(__name__)

_COUNTER_SECONDS = 7 * 24 * 3600


def _counter_key(task_id: str) -> str:
    return f"celery:deliveries:{task_id}"


def delivery_count(task_id: str) -> int:
    """Count one more delivery of `task_id`; returns the count including this one."""
    from django.core.cache import cache

    key = _counter_key(task_id)
    cache.add(key, 0, timeout=_COUNTER_SECONDS)
    try:
        return int(cache.incr(key))
    except ValueError:  # expired between add and incr
        cache.set(key, 1, timeout=_COUNTER_SECONDS)
        return 1


def delivery_forget(task_id: str) -> None:
    from django.core.cache import cache

    cache.delete(_counter_key(task_id))


def task_park(*, task_id: str, task_name: str, args, kwargs, deliveries: int, reason: str) -> None:
    from .models import ParkedTask

    ParkedTask.objects.update_or_create(task_id=task_id, defaults={
        "task_name": task_name, "args": list(args or []), "kwargs": dict(kwargs or {}), "deliveries": deliveries,
        "reason": reason[:300], "requeued_at": None})


class DeliveryCappedTask(Task):
    """The app's Task class (kotaemon_site/celery.py): see the module docstring."""

    def __call__(self, *args, **kwargs):
        request = self.request
        if getattr(request, "is_eager", False) or not request.id:
            return super().__call__(*args, **kwargs)  # inline: there is no redelivery to cap
        from django.conf import settings

        cap = getattr(settings, "CELERY_MAX_DELIVERIES", 0)
        try:
            deliveries = delivery_count(request.id) if cap > 0 else 0
        except Exception:  # the cache is down: run it (the cap is a safety net, not a gate)
            logger.warning("delivery counter unavailable", exc_info=True)
            deliveries = 0
        if cap > 0 and deliveries > cap:
            reason = (f"delivered {deliveries} times without finishing (the worker died each time, e.g. out of "
                      f"memory); parked after CELERY_MAX_DELIVERIES={cap}")
            task_park(task_id=request.id, task_name=self.name, args=args, kwargs=kwargs, deliveries=deliveries - 1,
                      reason=reason)
            delivery_forget(request.id)
            logger.error("task parked", extra={"task": self.name, "task_id": request.id, "deliveries": deliveries - 1})
            raise Reject(reason, requeue=False)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            # Returned or raised (retries included): the message is settled; only a dead worker skips this.
            if cap > 0:
                try:
                    delivery_forget(request.id)
                except Exception:
                    logger.warning("delivery counter unavailable", exc_info=True)


def parked_task_requeue(*, parked) -> bool:
    """Send a parked task again (same name, arguments and id) with a fresh delivery count."""
    from django.utils import timezone

    from kotaemon_site.celery import app

    delivery_forget(parked.task_id)
    app.send_task(parked.task_name, args=parked.args, kwargs=parked.kwargs, task_id=parked.task_id)
    parked.requeued_at = timezone.now()
    parked.save(update_fields=["requeued_at"])
    return True


@shared_task(name="core.ping")
def ping(value: str = "pong") -> dict:
    """Liveness probe for workers: returns what it was given and which worker ran it."""
    import os
    import socket

    return {"value": value, "host": socket.gethostname(), "pid": os.getpid()}
