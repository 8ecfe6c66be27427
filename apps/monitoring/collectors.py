"""Metrics computed at scrape time from state other apps keep (database, instance registry, index
registry), plus the chat-level retrieval outcome counted through the conversations hook point.

Each family is registered only if no app registered the same name first (an app that owns the
figure wins); every read is guarded, so /metrics answers even with the database or Redis down.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterator

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from apps.core.logging import current_request_var

from .metrics import REGISTRY

logger = logging.getLogger(__name__)

DB_CACHE_SECONDS = 10.0

chat_retrievals_total = Counter(
    "kotaemon_chat_retrievals_total",
    "Chat-turn retrievals by result: found (sources to ground the answer on), empty (nothing relevant: "
    "the empty-result rate is empty / (found + empty)), skipped (a plugin answered instead)",
    ["result"], registry=REGISTRY,
)


def chat_retrieval_hook(stage: str, ctx: Any) -> None:
    """A conversations turn hook (observation only: it never changes the turn)."""
    if stage != "after_retrieval":
        return
    if getattr(ctx, "skip_retrieval", False):
        result = "skipped"
    else:
        result = "found" if getattr(ctx, "sources", None) else "empty"
    chat_retrievals_total.labels(result).inc()


class ClusterStateCollector(Collector):
    FAMILIES = {
        "kotaemon_index_active_version": "Active index version per knowledge base (database; same on every instance)",
        "kotaemon_index_size_chunks": "Chunks in the active index version per knowledge base",
        "kotaemon_index_loaded_version": "Index version per knowledge base loaded in this process "
                                         "(below the active version: this instance serves a stale index)",
        "kotaemon_instance_heartbeat_timestamp": "Unix time of this instance's last heartbeat in the instance "
                                                 "registry (0 when its record is missing)",
    }

    def __init__(self, names: set[str]):
        self.names = names
        self._lock = threading.Lock()
        self._db_cache: tuple[float, list[tuple[str, int, int]]] = (0.0, [])

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for name in self.names:
            yield GaugeMetricFamily(name, self.FAMILIES[name], labels=self._labels(name))

    @staticmethod
    def _labels(name: str) -> list[str]:
        return [] if name == "kotaemon_instance_heartbeat_timestamp" else ["kb"]

    def _active(self) -> list[tuple[str, int, int]]:
        """(kb slug, active version, chunks) for every knowledge base, cached for a few seconds."""
        with self._lock:
            stamp, rows = self._db_cache
            if time.monotonic() - stamp < DB_CACHE_SECONDS:
                return rows
        from django.apps import apps

        try:
            KnowledgeBase = apps.get_model("knowledge", "KnowledgeBase")
            IndexVersion = apps.get_model("knowledge", "IndexVersion")
        except LookupError:
            return []
        active = {kb_id: (version, chunks) for kb_id, version, chunks in IndexVersion.objects.filter(
            status="active").values_list("knowledge_base_id", "version", "chunk_count")}
        rows = [(slug, *active.get(pk, (0, 0))) for pk, slug in KnowledgeBase.objects.values_list("pk", "slug")]
        with self._lock:
            self._db_cache = (time.monotonic(), rows)
        return rows

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {name: GaugeMetricFamily(name, self.FAMILIES[name], labels=self._labels(name))
                    for name in self.names}
        slugs: dict[int, str] = {}
        # The database is read only inside a Django request (the /metrics view), whose connection Django
        # manages; a worker's metrics server thread would open one per scrape and never close it.
        in_request = current_request_var.get() is not None
        if in_request and {"kotaemon_index_active_version", "kotaemon_index_size_chunks",
                           "kotaemon_index_loaded_version"} & self.names:
            try:
                rows = self._active()
                from django.apps import apps

                slugs = dict(apps.get_model("knowledge", "KnowledgeBase").objects.values_list("pk", "slug")) \
                    if "kotaemon_index_loaded_version" in self.names else {}
                for slug, version, chunks in rows:
                    if "kotaemon_index_active_version" in families:
                        families["kotaemon_index_active_version"].add_metric([slug], version)
                    if "kotaemon_index_size_chunks" in families:
                        families["kotaemon_index_size_chunks"].add_metric([slug], chunks)
            except Exception as exc:
                logger.debug("index state unavailable for metrics: %s", exc.__class__.__name__)
        if "kotaemon_index_loaded_version" in families:
            try:
                from apps.knowledge.index_registry import registry

                for kb_id, version in sorted(registry.held_versions().items()):
                    families["kotaemon_index_loaded_version"].add_metric([slugs.get(kb_id, str(kb_id))], version)
            except Exception as exc:
                logger.debug("index registry unavailable for metrics: %s", exc.__class__.__name__)
        if "kotaemon_instance_heartbeat_timestamp" in families:
            families["kotaemon_instance_heartbeat_timestamp"].add_metric([], self._heartbeat())
        yield from families.values()

    @staticmethod
    def _heartbeat() -> float:
        try:
            from django.conf import settings

            from apps.core.registry import instances_list

            mine = [r for r in instances_list() if r.get("id") == settings.INSTANCE_ID]
            return float(mine[0].get("heartbeat", 0)) if mine else 0.0
        except Exception:  # no registry, or Redis down: no heartbeat can be seen, which is the point
            return 0.0


_installed = False
_collector: ClusterStateCollector | None = None


def reset_cache() -> None:
    """Forget the cached database figures (tests; an operator never needs it: they expire in seconds)."""
    if _collector is not None:
        with _collector._lock:
            _collector._db_cache = (0.0, [])


def install() -> None:
    """Register what no other app registered, and the chat retrieval hook. Idempotent."""
    global _installed, _collector
    if _installed:
        return
    _installed = True
    taken = set(getattr(REGISTRY, "_names_to_collectors", {}))
    names = {name for name in ClusterStateCollector.FAMILIES if name not in taken}
    if names:
        _collector = ClusterStateCollector(names)
        REGISTRY.register(_collector)
    try:
        from apps.conversations.hooks import register_turn_hook
    except ImportError:
        return
    register_turn_hook(chat_retrieval_hook)
