"""The index versions this process holds in memory, one per knowledge base, swapped atomically.

Double buffering: a new version is loaded beside the one being served and then the pointer is
swapped, so a request holds one complete IndexBundle for its whole search and never sees a
half-loaded one. Which version is active comes from the database (the authority): the active map is
re-read at most every KNOWLEDGE_VERSION_CHECK_SECONDS, and a `knowledge_updated` event updates it at
once, so a missed event (channel-layer delivery is at-most-once) heals within that bound.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from .metrics import index_loads_total
from .rag.errors import IndexLoadError
from .rag.index import IndexBundle, version_dirname

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActiveVersion:
    version: int
    path: str


class IndexRegistry:
    def __init__(self) -> None:
        self._held: dict[int, IndexBundle] = {}
        self._active: dict[int, ActiveVersion] = {}
        self._checked_at = float("-inf")
        self._lock = threading.Lock()
        self._load_locks: dict[int, threading.Lock] = {}
        self._rebuild_requested: set[tuple[int, int]] = set()

    # -- the authoritative version map ------------------------------------------------------

    def active_versions(self, *, refresh: bool = False) -> dict[int, ActiveVersion]:
        if refresh or time.monotonic() - self._checked_at >= settings.KNOWLEDGE_VERSION_CHECK_SECONDS:
            from .models import IndexVersion

            rows = IndexVersion.objects.filter(status=IndexVersion.Status.ACTIVE).values_list(
                "knowledge_base_id", "version", "artifact_path")
            fresh = {kb_id: ActiveVersion(version, path) for kb_id, version, path in rows}
            with self._lock:
                # An event may have announced a newer version than this read saw; keep the newer one.
                for kb_id, known in self._active.items():
                    if kb_id in fresh and known.version > fresh[kb_id].version:
                        fresh[kb_id] = known
                self._active = fresh
                self._checked_at = time.monotonic()
                for kb_id in [k for k in self._held if k not in fresh]:
                    del self._held[kb_id]  # knowledge base deleted or has no index any more
        return self._active

    def held_versions(self) -> dict[int, int]:
        """{knowledge base id: version} loaded in this process (for heartbeats and diagnostics)."""
        return {kb_id: bundle.version for kb_id, bundle in list(self._held.items())}

    # -- bundles ----------------------------------------------------------------------------

    def bundle(self, knowledge_base_id: int) -> IndexBundle | None:
        """The active version's bundle, loading it on first use or when a newer one is active."""
        active = self.active_versions().get(knowledge_base_id)
        if active is None:
            return None
        held = self._held.get(knowledge_base_id)
        if held is not None and held.version >= active.version:
            return held
        try:
            return self._load(knowledge_base_id, active, trigger="check")
        except IndexLoadError:
            # The map may be stale (the version was retired and removed): re-read the authority once.
            active = self.active_versions(refresh=True).get(knowledge_base_id)
            if active is None:
                return None
            try:
                return self._load(knowledge_base_id, active, trigger="check")
            except IndexLoadError:
                logger.exception("index version cannot be loaded", extra={"knowledge_base": knowledge_base_id})
                return self._held.get(knowledge_base_id)

    def _load(self, knowledge_base_id: int, active: ActiveVersion, *, trigger: str) -> IndexBundle:
        with self._lock:
            load_lock = self._load_locks.setdefault(knowledge_base_id, threading.Lock())
        with load_lock:  # one loader per knowledge base; the others then find it loaded
            held = self._held.get(knowledge_base_id)
            if held is not None and held.version >= active.version:
                return held
            bundle = IndexBundle.load(active.path)
            self._held[knowledge_base_id] = bundle  # the swap: readers hold whichever bundle they fetched
            index_loads_total.labels(trigger=trigger).inc()
            logger.info("index version loaded", extra={"knowledge_base": knowledge_base_id,
                                                       "version": bundle.version, "trigger": trigger})
        if not bundle.analyzer_current:  # outside the lock: an eager rebuild loads its version here
            self._rebuild_for_analyzer(knowledge_base_id, bundle.version)
        return bundle

    def _rebuild_for_analyzer(self, knowledge_base_id: int, version: int) -> None:
        """The version's BM25 was built by another analyzer (an upgrade changed tokenization): it
        answers no keyword query until rebuilt, so a rebuild is requested once per version."""
        with self._lock:
            if (knowledge_base_id, version) in self._rebuild_requested:
                return
            self._rebuild_requested.add((knowledge_base_id, version))
        logger.warning("index version built by another analyzer; rebuilding",
                       extra={"knowledge_base": knowledge_base_id, "version": version})
        from .services import index_rebuild_enqueue

        try:
            index_rebuild_enqueue(knowledge_base_id)
        except Exception:
            logger.exception("rebuild request failed", extra={"knowledge_base": knowledge_base_id})

    def on_knowledge_updated(self, event: dict) -> None:
        """Event handler: record the newer version; pre-load it only if this process serves that base."""
        payload = event.get("payload") or {}
        kb_id, version = payload.get("knowledge_base"), payload.get("version")
        if not isinstance(kb_id, int) or not isinstance(version, int):
            return
        from .services import kb_index_root

        active = ActiveVersion(version, str(Path(kb_index_root(kb_id)) / version_dirname(version)))
        with self._lock:
            known = self._active.get(kb_id)
            if known is not None and known.version >= version:
                return
            self._active[kb_id] = active
        if kb_id in self._held:
            try:
                self._load(kb_id, active, trigger="event")
            except IndexLoadError:
                logger.warning("announced index version not loadable yet", extra={"knowledge_base": kb_id,
                                                                                   "version": version})

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
            self._active.clear()
            self._checked_at = float("-inf")
            self._rebuild_requested.clear()


registry = IndexRegistry()
