"""Answers as streams of events, buffered so that any instance can serve a reconnect, with a lease
so that exactly one instance generates each turn at a time.

One interface (TurnStreamBackend) and two implementations chosen by TURN_STREAM_BACKEND, like the
session store: "memory" (one process, the embedded default) and "redis" (Redis Streams, shared by
every instance).

Per turn:
- events: an append-only log with integer offsets 1, 2, 3, ... (Redis stream entry ids "0-<offset>"),
  each a JSON object {"type": "turn" | "token" | "reset" | "answer" | "error", ...}; "answer" and
  "error" are terminal. The log expires TURN_STREAM_TTL_SECONDS after its last append and is capped
  at TURN_STREAM_MAXLEN entries.
- lease: the owner token of the process generating the turn, with a TTL (TURN_LEASE_SECONDS) that the
  owner's heartbeat renews. Every append is fenced by the lease in one atomic step (a Lua script on
  Redis): a process that lost its lease (paused, partitioned, presumed dead) can no longer write, so
  two generators never interleave in one log. A terminal append releases the lease.
- spec: what is needed to run the turn again elsewhere (who, which conversation, which message rows),
  plus the retrieval context once computed, so that a takeover does not call plugins twice.
- the active set: turns not yet terminal, scanned by every instance's reconciler to take over turns
  whose lease expired (the owner died).

This module knows nothing of chat: apps.conversations.services runs turns on top of it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from django.conf import settings

logger = logging.getLogger(__name__)

TERMINAL = frozenset({"answer", "error"})
Event = tuple[int, dict[str, Any]]


class LeaseLost(Exception):
    """This process no longer holds the turn's lease: another instance took it over."""


def new_turn_id() -> str:
    return uuid.uuid4().hex


def new_owner_token() -> str:
    return f"{settings.INSTANCE_ID}:{uuid.uuid4().hex[:12]}"


# --- interface ----------------------------------------------------------------------------

class TurnStreamBackend(ABC):
    def __init__(self, *, ttl_seconds: int, maxlen: int, lease_seconds: float):
        self.ttl_seconds = ttl_seconds
        self.maxlen = maxlen
        self.lease_seconds = lease_seconds

    @abstractmethod
    def create(self, turn_id: str, *, owner: str, spec: dict[str, Any], session_id: str) -> bool:
        """Register a new turn held by `owner`; False if the id exists."""

    @abstractmethod
    def append(self, turn_id: str, *, owner: str, offset: int, event: dict[str, Any]) -> bool:
        """Write event at `offset` if `owner` holds the lease (False otherwise). A terminal event
        releases the lease and leaves the active set."""

    @abstractmethod
    def read(self, turn_id: str, *, after: int = 0, limit: int | None = None) -> list[Event]: ...

    @abstractmethod
    def wait(self, turn_id: str, *, after: int, timeout: float) -> list[Event]:
        """Events after `after`, blocking up to `timeout` seconds for the first one."""

    @abstractmethod
    def last(self, turn_id: str) -> Event | None: ...

    @abstractmethod
    def lease_holder(self, turn_id: str) -> str | None: ...

    @abstractmethod
    def lease_acquire(self, turn_id: str, owner: str) -> bool:
        """Take the lease if nobody holds it (the holder died or released it)."""

    @abstractmethod
    def lease_renew(self, turn_id: str, owner: str) -> bool: ...

    @abstractmethod
    def spec(self, turn_id: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def spec_update(self, turn_id: str, fields: dict[str, Any]) -> None: ...

    @abstractmethod
    def session_turn(self, session_id: str) -> str | None:
        """The most recent turn started in a session (terminal or not), while its log lives."""

    @abstractmethod
    def active(self, limit: int = 100) -> list[str]:
        """Turns that have not reached a terminal event."""

    @abstractmethod
    def forget(self, turn_id: str) -> None:
        """Drop a turn from the active set (its log expired or is unusable)."""


# --- in-memory ----------------------------------------------------------------------------

class _MemoryTurn:
    __slots__ = ("events", "lease", "lease_expires", "spec", "expires")

    def __init__(self, owner: str, spec: dict, lease_expires: float, expires: float):
        self.events: list[Event] = []
        self.lease: str | None = owner
        self.lease_expires = lease_expires
        self.spec = spec
        self.expires = expires


class MemoryTurnStream(TurnStreamBackend):
    """One process only. Same semantics as Redis, including lease expiry, so tests of the service
    logic run on either."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._turns: dict[str, _MemoryTurn] = {}
        self._sessions: dict[str, str] = {}
        self._cond = threading.Condition()

    def _get(self, turn_id: str) -> _MemoryTurn | None:
        turn = self._turns.get(turn_id)
        now = time.monotonic()
        if turn is not None and turn.expires <= now:
            del self._turns[turn_id]
            return None
        if turn is not None and turn.lease is not None and turn.lease_expires <= now:
            turn.lease = None
        return turn

    def _sweep(self) -> None:
        now = time.monotonic()
        for turn_id in [t for t, turn in self._turns.items() if turn.expires <= now]:
            del self._turns[turn_id]

    def create(self, turn_id, *, owner, spec, session_id):
        with self._cond:
            if len(self._turns) > 1000:
                self._sweep()
            if self._get(turn_id) is not None:
                return False
            now = time.monotonic()
            self._turns[turn_id] = _MemoryTurn(owner, dict(spec), now + self.lease_seconds, now + self.ttl_seconds)
            self._sessions[session_id] = turn_id
            return True

    def append(self, turn_id, *, owner, offset, event):
        with self._cond:
            turn = self._get(turn_id)
            if turn is None or turn.lease != owner:
                return False
            if turn.events and turn.events[-1][0] >= offset:
                raise ValueError(f"offset {offset} is not after {turn.events[-1][0]}")
            turn.events.append((offset, json.loads(json.dumps(event))))
            del turn.events[:-self.maxlen]
            turn.expires = time.monotonic() + self.ttl_seconds
            if event.get("type") in TERMINAL:
                turn.lease = None
            self._cond.notify_all()
            return True

    def read(self, turn_id, *, after=0, limit=None):
        with self._cond:
            turn = self._get(turn_id)
            events = [e for e in turn.events if e[0] > after] if turn else []
        return events[:limit] if limit else events

    def wait(self, turn_id, *, after, timeout):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                turn = self._get(turn_id)
                events = [e for e in turn.events if e[0] > after] if turn else []
                remaining = deadline - time.monotonic()
                if events or remaining <= 0 or turn is None:
                    return events
                self._cond.wait(min(remaining, 0.5))

    def last(self, turn_id):
        with self._cond:
            turn = self._get(turn_id)
            return turn.events[-1] if turn and turn.events else None

    def lease_holder(self, turn_id):
        with self._cond:
            turn = self._get(turn_id)
            return turn.lease if turn else None

    def lease_acquire(self, turn_id, owner):
        with self._cond:
            turn = self._get(turn_id)
            if turn is None or turn.lease is not None or (turn.events and turn.events[-1][1].get("type") in TERMINAL):
                return False
            turn.lease, turn.lease_expires = owner, time.monotonic() + self.lease_seconds
            return True

    def lease_renew(self, turn_id, owner):
        with self._cond:
            turn = self._get(turn_id)
            if turn is None or turn.lease != owner:
                return False
            turn.lease_expires = time.monotonic() + self.lease_seconds
            return True

    def spec(self, turn_id):
        with self._cond:
            turn = self._get(turn_id)
            return json.loads(json.dumps(turn.spec)) if turn else None

    def spec_update(self, turn_id, fields):
        with self._cond:
            turn = self._get(turn_id)
            if turn is not None:
                turn.spec.update(json.loads(json.dumps(fields)))

    def session_turn(self, session_id):
        with self._cond:
            turn_id = self._sessions.get(session_id)
            return turn_id if turn_id and self._get(turn_id) is not None else None

    def active(self, limit=100):
        with self._cond:
            ids = [t for t in list(self._turns) if (turn := self._get(t)) is not None
                   and not (turn.events and turn.events[-1][1].get("type") in TERMINAL)]
        return ids[:limit]

    def forget(self, turn_id):
        with self._cond:
            self._turns.pop(turn_id, None)

    def clear(self) -> None:
        with self._cond:
            self._turns.clear()
            self._sessions.clear()


# --- Redis --------------------------------------------------------------------------------

# KEYS: events stream, lease, active set. ARGV: owner, offset, payload, maxlen, ttl ms, terminal, turn id.
_APPEND_LUA = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '0-' .. ARGV[2], 'e', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if ARGV[6] == '1' then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[7])
end
return 1
"""
# KEYS: lease. ARGV: owner, lease ms.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class RedisTurnStream(TurnStreamBackend):
    def __init__(self, *, client, key_prefix: str, **kw):
        super().__init__(**kw)
        self.client = client
        self.prefix = key_prefix
        self._append = client.register_script(_APPEND_LUA)
        self._renew = client.register_script(_RENEW_LUA)

    def _k(self, turn_id: str, part: str) -> str:
        return f"{self.prefix}:{turn_id}:{part}"

    @property
    def _active_key(self) -> str:
        return f"{self.prefix}:active"

    @property
    def _ttl_ms(self) -> int:
        return int(self.ttl_seconds * 1000)

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.lease_seconds * 1000))

    @staticmethod
    def _decode(entries) -> list[Event]:
        out = []
        for entry_id, fields in entries or []:
            raw = fields.get(b"e") if b"e" in fields else fields.get("e")
            entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            out.append((int(entry_id.split("-", 1)[1]), json.loads(raw)))
        return out

    def create(self, turn_id, *, owner, spec, session_id):
        if not self.client.set(self._k(turn_id, "lease"), owner, nx=True, px=self._lease_ms):
            return False
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._k(turn_id, "spec"), json.dumps(spec), ex=self.ttl_seconds)
        pipe.set(f"{self.prefix}:session:{session_id}", turn_id, ex=self.ttl_seconds)
        pipe.zadd(self._active_key, {turn_id: time.time()})
        pipe.execute()
        return True

    def append(self, turn_id, *, owner, offset, event):
        terminal = "1" if event.get("type") in TERMINAL else "0"
        ok = self._append(keys=[self._k(turn_id, "events"), self._k(turn_id, "lease"), self._active_key],
                          args=[owner, offset, json.dumps(event, ensure_ascii=False, separators=(",", ":")),
                                self.maxlen, self._ttl_ms, terminal, turn_id])
        if ok and terminal == "1":
            # The spec outlives nothing: it expires with the log.
            self.client.expire(self._k(turn_id, "spec"), self.ttl_seconds)
        return bool(ok)

    def read(self, turn_id, *, after=0, limit=None):
        return self._decode(self.client.xrange(self._k(turn_id, "events"), min=f"(0-{after}", max="+",
                                               count=limit))

    def wait(self, turn_id, *, after, timeout):
        reply = self.client.xread({self._k(turn_id, "events"): f"0-{after}"}, block=max(1, int(timeout * 1000)))
        return self._decode(reply[0][1]) if reply else []

    def last(self, turn_id):
        events = self._decode(self.client.xrevrange(self._k(turn_id, "events"), count=1))
        return events[0] if events else None

    def lease_holder(self, turn_id):
        value = self.client.get(self._k(turn_id, "lease"))
        return value.decode() if isinstance(value, bytes) else value

    def lease_acquire(self, turn_id, owner):
        last = self.last(turn_id)
        if last is not None and last[1].get("type") in TERMINAL:
            return False
        return bool(self.client.set(self._k(turn_id, "lease"), owner, nx=True, px=self._lease_ms))

    def lease_renew(self, turn_id, owner):
        return bool(self._renew(keys=[self._k(turn_id, "lease")], args=[owner, self._lease_ms]))

    def spec(self, turn_id):
        raw = self.client.get(self._k(turn_id, "spec"))
        return json.loads(raw) if raw else None

    def spec_update(self, turn_id, fields):
        # Only the lease holder writes here, so read-modify-write does not race in practice; a lost
        # update would only make a takeover run retrieval again.
        current = self.spec(turn_id)
        if current is not None:
            current.update(fields)
            self.client.set(self._k(turn_id, "spec"), json.dumps(current), ex=self.ttl_seconds)

    def session_turn(self, session_id):
        value = self.client.get(f"{self.prefix}:session:{session_id}")
        return value.decode() if isinstance(value, bytes) else value

    def active(self, limit=100):
        return [t.decode() if isinstance(t, bytes) else t for t in self.client.zrange(self._active_key, 0, limit - 1)]

    def forget(self, turn_id):
        self.client.zrem(self._active_key, turn_id)


# --- the configured backend, local fan-out and lease keeping --------------------------------

_backend: TurnStreamBackend | None = None
_backend_lock = threading.Lock()


def build_backend(backend: str | None = None) -> TurnStreamBackend:
    backend = backend or settings.TURN_STREAM_BACKEND
    kw = dict(ttl_seconds=settings.TURN_STREAM_TTL_SECONDS, maxlen=settings.TURN_STREAM_MAXLEN,
              lease_seconds=settings.TURN_LEASE_SECONDS)
    if backend == "memory":
        return MemoryTurnStream(**kw)
    if backend == "redis":
        from django_redis import get_redis_connection

        return RedisTurnStream(client=get_redis_connection("default"), key_prefix=f"{settings.CACHE_KEY_PREFIX}:turn",
                               **kw)
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(f"TURN_STREAM_BACKEND must be 'memory' or 'redis', not {backend!r}.")


def get_backend() -> TurnStreamBackend:
    global _backend
    if _backend is None:
        with _backend_lock:
            if _backend is None:
                _backend = build_backend()
    return _backend


def turn_stream_reset() -> None:
    """Forget the configured backend and the local producers (after settings change, in tests)."""
    global _backend
    with _backend_lock:
        _backend = None
    _keeper.clear()
    with _fanout_lock:
        _subscribers.clear()


# Readers on the instance that generates a turn get its events from memory, without a Redis read
# per token; readers elsewhere block on the backend (XREAD).
_subscribers: dict[str, list[Callable[[Event], None]]] = {}
_fanout_lock = threading.Lock()


def _notify(turn_id: str, event: Event) -> None:
    with _fanout_lock:
        callbacks = list(_subscribers.get(turn_id, ()))
    for callback in callbacks:
        try:
            callback(event)
        except Exception:  # a closed loop of a gone reader
            logger.debug("turn subscriber failed", exc_info=True)


def _subscribe(turn_id: str, callback: Callable[[Event], None]) -> Callable[[], None]:
    with _fanout_lock:
        _subscribers.setdefault(turn_id, []).append(callback)

    def unsubscribe() -> None:
        with _fanout_lock:
            callbacks = _subscribers.get(turn_id, [])
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks:
                _subscribers.pop(turn_id, None)

    return unsubscribe


class _LeaseKeeper:
    """One daemon thread per process renews the leases of the turns this process generates, every
    third of the lease; a lease that could not be renewed is reported lost to its writer."""

    def __init__(self) -> None:
        self._held: dict[str, str] = {}  # turn id -> owner token
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, turn_id: str, owner: str) -> None:
        with self._lock:
            self._held[turn_id] = owner
            self._lost.discard(turn_id)
            self._wake.set()  # the period may have changed (settings): recompute it now
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="turn-lease-keeper", daemon=True)
                self._thread.start()

    def release(self, turn_id: str) -> None:
        with self._lock:
            self._held.pop(turn_id, None)
            self._lost.discard(turn_id)

    def is_local(self, turn_id: str) -> bool:
        with self._lock:
            return turn_id in self._held

    def lost(self, turn_id: str) -> bool:
        with self._lock:
            return turn_id in self._lost

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
            self._lost.clear()

    def _run(self) -> None:
        while True:
            backend = _backend
            period = max(0.05, (backend.lease_seconds if backend else 3.0) / 3)
            if self._wake.wait(period):
                self._wake.clear()
                continue
            backend = _backend
            with self._lock:
                held = dict(self._held)
            if backend is None:
                continue
            for turn_id, owner in held.items():
                try:
                    ok = backend.lease_renew(turn_id, owner)
                except Exception:
                    logger.warning("turn lease renewal failed", exc_info=True)
                    continue  # Redis hiccup: try again next period; the lease may still be ours
                if not ok:
                    with self._lock:
                        if self._held.get(turn_id) == owner:
                            del self._held[turn_id]
                            self._lost.add(turn_id)
                    logger.warning("turn lease lost", extra={"turn_id": turn_id})


_keeper = _LeaseKeeper()


class TurnWriter:
    """The lease holder's side of one turn: appends events with consecutive offsets."""

    def __init__(self, turn_id: str, owner: str, *, next_offset: int = 1):
        self.turn_id = turn_id
        self.owner = owner
        self.offset = next_offset - 1
        self.backend = get_backend()
        _keeper.hold(turn_id, owner)

    def emit(self, event: dict[str, Any]) -> int:
        if _keeper.lost(self.turn_id):
            raise LeaseLost(self.turn_id)
        offset = self.offset + 1
        if not self.backend.append(self.turn_id, owner=self.owner, offset=offset, event=event):
            _keeper.release(self.turn_id)
            raise LeaseLost(self.turn_id)
        self.offset = offset
        if event.get("type") in TERMINAL:
            _keeper.release(self.turn_id)
        _notify(self.turn_id, (offset, event))
        return offset

    def still_holds(self) -> bool:
        return not _keeper.lost(self.turn_id) and self.backend.lease_renew(self.turn_id, self.owner)

    def close(self) -> None:
        _keeper.release(self.turn_id)


def turn_create(turn_id: str, *, spec: dict[str, Any], session_id: str) -> TurnWriter:
    owner = new_owner_token()
    if not get_backend().create(turn_id, owner=owner, spec=spec, session_id=session_id):
        raise ValueError(f"turn {turn_id} exists")
    return TurnWriter(turn_id, owner)


def turn_acquire(turn_id: str) -> TurnWriter | None:
    """Take over a turn whose lease expired: a writer continuing after its last offset, or None."""
    backend = get_backend()
    owner = new_owner_token()
    if not backend.lease_acquire(turn_id, owner):
        return None
    last = backend.last(turn_id)
    return TurnWriter(turn_id, owner, next_offset=(last[0] if last else 0) + 1)


def is_local(turn_id: str) -> bool:
    return _keeper.is_local(turn_id)


# Blocking reads of followers on other instances (XREAD BLOCK up to idle_seconds) get their own threads,
# so that many resumed streams cannot starve the default executor that chat turns and the ORM use.
_read_pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="turn-read")


async def _off_loop(fn, *args, **kwargs):
    import functools

    return await asyncio.get_running_loop().run_in_executor(_read_pool, functools.partial(fn, *args, **kwargs))


async def turn_follow(turn_id: str, *, after: int = 0, idle_seconds: float = 1.0,
                      on_orphan: Callable[[str], Any] | None = None) -> AsyncIterator[Event]:
    """Every event of a turn after offset `after`, until a terminal one.

    Events generated in this process come from memory; others from the backend. When a turn goes
    quiet for `idle_seconds` and nobody holds its lease (its owner died), `on_orphan(turn_id)` is
    awaited in a thread (it may take the turn over); the follow ends if the log is gone.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def deliver(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the loop closed: the reader is gone
            pass

    backend = get_backend()
    unsubscribe = _subscribe(turn_id, deliver)
    last = after
    try:
        for offset, event in await _off_loop(backend.read, turn_id, after=after):
            last = offset
            yield offset, event
            if event.get("type") in TERMINAL:
                return
        while True:
            batch: list[Event] = []
            if is_local(turn_id) or not queue.empty():
                try:
                    batch = [await asyncio.wait_for(queue.get(), timeout=idle_seconds)]
                    while not queue.empty():
                        batch.append(queue.get_nowait())
                except asyncio.TimeoutError:
                    batch = []
            else:
                batch = await _off_loop(backend.wait, turn_id, after=last, timeout=idle_seconds)
            if batch and batch[0][0] > last + 1:
                # Local delivery skipped something (subscribed late, or a takeover here): fill from the log.
                batch = await _off_loop(backend.read, turn_id, after=last)
            fresh = [e for e in batch if e[0] > last]
            for offset, event in fresh:
                last = offset
                yield offset, event
                if event.get("type") in TERMINAL:
                    return
            if fresh:
                continue
            # Quiet: is anyone still generating it?
            holder = await _off_loop(backend.lease_holder, turn_id)
            if holder is None:
                tail = await _off_loop(backend.read, turn_id, after=last)
                if tail:
                    for offset, event in tail:
                        last = offset
                        yield offset, event
                        if event.get("type") in TERMINAL:
                            return
                    continue
                if await _off_loop(backend.spec, turn_id) is None:
                    return  # expired or never existed
                if on_orphan is not None:
                    await _off_loop(on_orphan, turn_id)
    finally:
        unsubscribe()
