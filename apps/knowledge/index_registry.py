"""The index versions this process holds in memory: an LRU of loaded views under a memory budget.

Double buffering: a newer version is loaded beside the one being served (in a background thread, or
in the event thread for `knowledge_updated`) and only then becomes the one searched; a request holds
one complete IndexBundle for its whole search, and never waits for a load while an older version of
its base is held. Versions of one base share their unchanged segments in memory (rag.index
SegmentCache), so a swap after an incremental build loads only the new segment.

Which version is active comes from the database (the authority): the active map is re-read at most
every KNOWLEDGE_VERSION_CHECK_SECONDS, and a `knowledge_updated` event updates it at once, so a missed
event (channel-layer delivery is at-most-once) heals within that bound.

Memory: after each load, the least recently searched bases are evicted until the loaded segments fit in
KNOWLEDGE_INDEX_MEMORY_BUDGET_MB (the base just loaded always stays); an evicted base is loaded again
on its next search. A version that cannot be loaded degrades only its own base: the previous version
keeps serving if one is held, otherwise its searches fail with `index_unavailable` (503); the failure is
counted, shown in the admin, and retried after LOAD_RETRY_SECONDS. Readiness never depends on it.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from .metrics import index_load_failures_total, index_loads_total, index_memory_bytes, indexes_degraded
from .rag.errors import IndexLoadError
from .rag.index import IndexBundle, version_dirname

logger = logging.getLogger(__name__)

LOAD_RETRY_SECONDS = 30.0


@dataclass(frozen=True)
class ActiveVersion:
    version: int
    path: str


@dataclass(frozen=True)
class LoadFailure:
    version: int
    error: str
    at: float  # time.monotonic()
    wall: float  # time.time(), for display


class IndexUnavailable(Exception):
    """The active version of a base cannot be loaded here and no older version is held."""

    def __init__(self, knowledge_base_id: int, failure: LoadFailure):
        super().__init__(f"index v{failure.version} of knowledge base {knowledge_base_id}: {failure.error}")
        self.knowledge_base_id, self.failure = knowledge_base_id, failure


class IndexRegistry:
    def __init__(self) -> None:
        self._held: OrderedDict[int, IndexBundle] = OrderedDict()  # least recently searched first
        self._active: dict[int, ActiveVersion] = {}
        self._failures: dict[int, LoadFailure] = {}
        self._loading: dict[int, tuple[int, threading.Event]] = {}
        self._checked_at = float("-inf")
        self._lock = threading.Lock()
        self._load_locks: dict[int, threading.Lock] = {}
        self._rebuild_requested: set[tuple[int, int]] = set()

    # -- the authoritative version map ------------------------------------------------------

    def active_versions(self, *, refresh: bool = False) -> dict[int, ActiveVersion]:
        if refresh or time.monotonic() - self._checked_at >= settings.KNOWLEDGE_VERSION_CHECK_SECONDS:
            from .models import IndexVersion

            rows = IndexVersion.objects.filter(status=IndexVersion.Status.ACTIVE,
                                               knowledge_base__deleted_at__isnull=True).values_list(
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
                for kb_id in [k for k in self._failures if k not in fresh]:
                    del self._failures[kb_id]
            self._update_gauges()
        return self._active

    def held_versions(self) -> dict[int, int]:
        """{knowledge base id: version} loaded in this process (for heartbeats and diagnostics)."""
        return {kb_id: bundle.version for kb_id, bundle in list(self._held.items())}

    def status(self, knowledge_base_id: int) -> dict:
        """This process's view of one base, for the admin: state ok / loading / degraded / unavailable / cold."""
        active = self._active.get(knowledge_base_id)
        held = self._held.get(knowledge_base_id)
        failure = self._failures.get(knowledge_base_id)
        info = {"active": active.version if active else None, "held": held.version if held else None,
                "error": failure.error if failure else "", "failed_version": failure.version if failure else None}
        if failure is not None and active is not None and failure.version >= active.version:
            info["state"] = "degraded" if held is not None else "unavailable"
        elif held is None:
            info["state"] = "cold"
        elif active is not None and held.version < active.version:
            info["state"] = "loading"
        else:
            info["state"] = "ok"
        return info

    def failures(self) -> dict[int, LoadFailure]:
        return dict(self._failures)

    def memory_bytes(self) -> int:
        """Resident bytes of the distinct segments held (versions of one base share segments)."""
        seen: dict[int, int] = {}
        for bundle in list(self._held.values()):
            for segment in bundle.segments:
                seen.setdefault(id(segment), segment.nbytes())
        return sum(seen.values())

    # -- bundles ----------------------------------------------------------------------------

    def bundle(self, knowledge_base_id: int) -> IndexBundle | None:
        """The bundle to search for a base: the active version when loaded, else the newest held one while
        the active version loads in the background. Loads synchronously only when nothing is held (cold).
        Raises IndexUnavailable when the active version cannot be loaded and nothing older is held."""
        active = self.active_versions().get(knowledge_base_id)
        if active is None:
            return None
        held = self._held.get(knowledge_base_id)
        if held is not None and held.version >= active.version:
            self._touch(knowledge_base_id)
            return held
        failure = self._failures.get(knowledge_base_id)
        if failure is not None and failure.version >= active.version and \
                time.monotonic() - failure.at < LOAD_RETRY_SECONDS:
            if held is not None:
                return held
            raise IndexUnavailable(knowledge_base_id, failure)
        if held is not None:
            done = self._load_in_background(knowledge_base_id, active)
            wait = settings.KNOWLEDGE_SWAP_WAIT_SECONDS
            if wait > 0:
                done.wait(wait)
            return self._held.get(knowledge_base_id) or held
        try:
            return self._load(knowledge_base_id, active, trigger="lazy")
        except IndexLoadError:
            # The map may be stale (the version was retired and removed): re-read the authority once.
            active = self.active_versions(refresh=True).get(knowledge_base_id)
            if active is None:
                return None
            try:
                return self._load(knowledge_base_id, active, trigger="lazy")
            except IndexLoadError as exc:
                failure = self._record_failure(knowledge_base_id, active, exc)
                held = self._held.get(knowledge_base_id)
                if held is not None:
                    return held
                raise IndexUnavailable(knowledge_base_id, failure) from exc

    def _touch(self, knowledge_base_id: int) -> None:
        with self._lock:
            if knowledge_base_id in self._held:
                self._held.move_to_end(knowledge_base_id)

    def _load_in_background(self, knowledge_base_id: int, active: ActiveVersion) -> threading.Event:
        with self._lock:
            running = self._loading.get(knowledge_base_id)
            if running is not None and running[0] >= active.version:
                return running[1]
            done = threading.Event()
            self._loading[knowledge_base_id] = (active.version, done)

        def run() -> None:
            try:
                self._load(knowledge_base_id, active, trigger="background")
            except IndexLoadError as exc:
                self._record_failure(knowledge_base_id, active, exc)
            except Exception as exc:  # never let a loader thread die silently
                self._record_failure(knowledge_base_id, active, exc)
            finally:
                with self._lock:
                    if self._loading.get(knowledge_base_id, (None, None))[1] is done:
                        del self._loading[knowledge_base_id]
                done.set()

        threading.Thread(target=run, name=f"index-load-{knowledge_base_id}", daemon=True).start()
        return done

    def _load(self, knowledge_base_id: int, active: ActiveVersion, *, trigger: str) -> IndexBundle:
        with self._lock:
            load_lock = self._load_locks.setdefault(knowledge_base_id, threading.Lock())
        with load_lock:  # one loader per knowledge base; the others then find it loaded
            held = self._held.get(knowledge_base_id)
            if held is not None and held.version >= active.version:
                return held
            started = time.perf_counter()
            bundle = IndexBundle.load(active.path, mmap=settings.KNOWLEDGE_INDEX_MMAP)
            with self._lock:
                self._held[knowledge_base_id] = bundle  # the swap: readers hold whichever bundle they fetched
                self._held.move_to_end(knowledge_base_id)
                failure = self._failures.get(knowledge_base_id)
                if failure is not None and failure.version <= bundle.version:
                    del self._failures[knowledge_base_id]
            index_loads_total.labels(trigger=trigger).inc()
            logger.info("index version loaded", extra={
                "knowledge_base": knowledge_base_id, "version": bundle.version, "trigger": trigger,
                "segments_read": bundle.loaded_segments, "segments": len(bundle.parts),
                "ms": round(1000 * (time.perf_counter() - started), 1)})
            self._evict(keep=knowledge_base_id)
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

    def _evict(self, *, keep: int) -> None:
        budget = settings.KNOWLEDGE_INDEX_MEMORY_BUDGET_MB * 1024 * 1024
        if budget > 0:
            while self.memory_bytes() > budget:
                with self._lock:
                    victim = next((k for k in self._held if k != keep), None)
                    if victim is None:
                        break
                    del self._held[victim]
                logger.info("index evicted (memory budget)", extra={"knowledge_base": victim})
        self._update_gauges()

    def _record_failure(self, knowledge_base_id: int, active: ActiveVersion, exc: Exception) -> LoadFailure:
        failure = LoadFailure(active.version, f"{type(exc).__name__}: {exc}"[:500], time.monotonic(), time.time())
        with self._lock:
            self._failures[knowledge_base_id] = failure
        index_load_failures_total.inc()
        self._update_gauges()
        logger.error("index version cannot be loaded", extra={"knowledge_base": knowledge_base_id,
                                                              "version": active.version, "error": failure.error})
        if "unsupported manifest format" in failure.error:  # written by an older release: rebuild it
            self._rebuild_for_analyzer(knowledge_base_id, active.version)
        return failure

    def _update_gauges(self) -> None:
        indexes_degraded.set(len(self._failures))
        index_memory_bytes.set(self.memory_bytes())

    def warm_up(self) -> list[str]:
        """Load active versions, most recently built first, while they fit the memory budget. Returns the bases
        that failed (they degrade alone: readiness does not wait for them)."""
        failed = []
        budget = settings.KNOWLEDGE_INDEX_MEMORY_BUDGET_MB * 1024 * 1024
        actives = sorted(self.active_versions(refresh=True).items(), key=lambda item: -item[1].version)
        for kb_id, _ in actives:
            if budget > 0 and self.memory_bytes() >= budget:
                break
            try:
                self.bundle(kb_id)
            except IndexUnavailable as exc:
                failed.append(f"{kb_id}:v{exc.failure.version}")
        return failed

    def on_knowledge_updated(self, event: dict) -> None:
        """Event handler: a held base loads the new version first and swaps to it only once loaded."""
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
        if kb_id in self._held:
            try:
                self._load(kb_id, active, trigger="event")
            except IndexLoadError:
                logger.warning("announced index version not loadable yet", extra={"knowledge_base": kb_id,
                                                                                   "version": version})
        with self._lock:
            known = self._active.get(kb_id)
            if known is None or known.version < version:
                self._active[kb_id] = active

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
            self._active.clear()
            self._failures.clear()
            self._loading.clear()
            self._checked_at = float("-inf")
            self._rebuild_requested.clear()


registry = IndexRegistry()
