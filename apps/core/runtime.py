"""Per-process setup of heavy numeric libraries (thread counts), called once per process kind."""
from __future__ import annotations

import os

_configured: set[int] = set()


def default_threads(kind: str) -> int:
    """Web processes serve many small requests: 1 thread each avoids oversubscribing 2 cores.
    Workers do large batched encodes: they may use the cores they have (capped at 2 by default)."""
    from django.conf import settings

    configured = getattr(settings, "TORCH_NUM_THREADS", 0)
    if configured:
        return configured
    return 1 if kind == "web" else max(1, min(2, os.cpu_count() or 1))


def configure_process(*, kind: str) -> None:
    pid = os.getpid()
    if pid in _configured:
        return
    _configured.add(pid)
    from apps.knowledge.rag.embedder import configure_threads

    configure_threads(default_threads(kind))
