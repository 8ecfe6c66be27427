"""Celery application.

Worker (production): celery -A kotaemon_site worker --pool=prefork --concurrency=2 -l info
Beat:                celery -A kotaemon_site beat -l info
Settings come from Django settings with the CELERY_ prefix (see settings.py): JSON only,
acks_late with reject_on_worker_lost (tasks must be idempotent), soft/hard time limits.
"""
import os

from celery import Celery
from celery.signals import worker_process_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kotaemon_site.settings")

# Every task counts its deliveries and is parked after CELERY_MAX_DELIVERIES (apps/core/tasks.py).
app = Celery("kotaemon_site", task_cls="apps.core.tasks:DeliveryCappedTask")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_process_init.connect
def _after_fork(**_kwargs) -> None:
    """Heavy libraries must be initialised in the child after fork (torch/FAISS OpenMP hang otherwise)."""
    from apps.core.runtime import configure_process

    configure_process(kind="worker")
