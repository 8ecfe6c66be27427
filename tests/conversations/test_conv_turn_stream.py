"""Resumable answers: the turn event log with offsets and leases (memory and real Redis), partial
answers saved as they are generated, takeover of a turn whose generator died, exactly once."""
from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest

from apps.conversations.turn_stream import LeaseLost, MemoryTurnStream, RedisTurnStream

KW = dict(ttl_seconds=60, maxlen=1000, lease_seconds=0.3)


@pytest.fixture(params=["memory", "redis"])
def backend(request):
    if request.param == "memory":
        yield MemoryTurnStream(**KW)
        return
    import redis

    client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    prefix = f"kt-turn-{uuid.uuid4().hex[:10]}"
    yield RedisTurnStream(client=client, key_prefix=prefix, **KW)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)


def test_log_offsets_fencing_lease_and_terminal(backend):
    assert backend.create("t1", owner="a", spec={"user_id": 1}, session_id="sess-0001")
    assert not backend.create("t1", owner="b", spec={}, session_id="sess-0001")  # one turn per id
    for offset, text in enumerate(["Hello ", "world"], start=1):
        assert backend.append("t1", owner="a", offset=offset, event={"type": "token", "text": text})
    assert not backend.append("t1", owner="b", offset=3, event={"type": "token", "text": "intruder"})  # fenced
    assert [o for o, _ in backend.read("t1")] == [1, 2] and backend.read("t1", after=1) == [(2, {"type": "token",
                                                                                                "text": "world"})]
    assert backend.last("t1")[0] == 2 and backend.lease_holder("t1") == "a"
    assert backend.session_turn("sess-0001") == "t1" and backend.active() == ["t1"]
    assert not backend.lease_acquire("t1", "b")  # held
    time.sleep(0.45)  # the owner stopped renewing: its lease expires
    assert backend.lease_holder("t1") is None and not backend.lease_renew("t1", "a")
    assert backend.lease_acquire("t1", "b") and not backend.lease_acquire("t1", "c")
    assert not backend.append("t1", owner="a", offset=3, event={"type": "token", "text": "zombie"})
    assert backend.append("t1", owner="b", offset=3, event={"type": "answer", "answer": "Hello world"})
    # A terminal event releases the lease and leaves the active set; nobody can take it any more.
    assert backend.lease_holder("t1") is None and backend.active() == []
    assert not backend.lease_acquire("t1", "c")
    backend.spec_update("t1", {"context": {"query": "q"}})
    assert backend.spec("t1") == {"user_id": 1, "context": {"query": "q"}}


def test_wait_blocks_until_an_event_arrives(backend):
    backend.create("t2", owner="a", spec={}, session_id="sess-0002")
    started = time.monotonic()
    assert backend.wait("t2", after=0, timeout=0.2) == [] and time.monotonic() - started >= 0.15
    # A fresh lease (the 0.3 s one may have run out while we waited above), then a late event.
    backend.forget("t2")
    backend.create("t3", owner="a", spec={}, session_id="sess-0002")
    threading.Timer(0.1, lambda: backend.append("t3", owner="a", offset=1, event={"type": "token", "text": "x"})).start()
    started = time.monotonic()
    assert backend.wait("t3", after=0, timeout=5) == [(1, {"type": "token", "text": "x"})]
    assert time.monotonic() - started < 2


# --- the chat service on top of it ----------------------------------------------------------------

pytestmark_db = pytest.mark.django_db(transaction=True)


def follow_all(turn_id: str, after: int = 0, timeout: float = 60, takeover: bool = True) -> list:
    from apps.conversations.services import turn_takeover
    from apps.conversations.turn_stream import turn_follow

    async def collect():
        out = []
        async for item in turn_follow(turn_id, after=after, idle_seconds=0.2,
                                      on_orphan=turn_takeover if takeover else None):
            out.append(item)
        return out

    return asyncio.run(asyncio.wait_for(collect(), timeout))


def text_of(events) -> str:
    from apps.conversations.services import shown_text

    return shown_text(events)


@pytest.fixture
def fast_lease(settings):
    from apps.conversations.turn_stream import turn_stream_reset

    # Short, but not shorter than a stall of a busy 2-core machine (first model use holds the GIL).
    settings.TURN_LEASE_SECONDS = 1.0
    turn_stream_reset()
    yield
    turn_stream_reset()


def die(handle) -> None:
    """What kill -9 leaves behind: no more heartbeats, no terminal event, the turn half done."""
    handle.writer.close()


@pytestmark_db
@pytest.mark.parametrize("prefix_ok", [True, False], ids=["same-prefix", "diverged"])
def test_an_orphaned_turn_is_taken_over_and_completed_once(user, kb, fast_lease, prefix_ok):
    from apps.conversations import metrics
    from apps.conversations.models import Message
    from apps.conversations.services import chat_turn, turn_open, turns_reconcile

    question = "How do I request a refund?"
    expected = chat_turn(user=user, session_id="reference-0001", message=question).answer
    before = metrics.turn_takeovers_total._value.get()
    handle = turn_open(user=user, session_id="orphan-turn-0001", message=question)
    shown = expected.split(" ")[0] + " " if prefix_ok else "Something else entirely "
    handle.writer.emit({"type": "token", "text": shown})
    die(handle)
    time.sleep(1.2)
    turns_reconcile()  # what every instance's reconciler does
    events = follow_all(handle.turn_id)
    kinds = [e["type"] for _, e in events]
    assert kinds[0] == "turn" and kinds[-1] == "answer"
    assert [o for o, _ in events] == list(range(1, len(events) + 1))
    assert ("reset" in kinds) is (not prefix_ok)  # a different regenerated text is announced, not appended
    assert text_of(events).strip() == expected == events[-1][1]["answer"]
    messages = list(Message.objects.filter(conversation__session_id="orphan-turn-0001").order_by("id"))
    assert [(m.role, m.status) for m in messages] == [("user", "complete"), ("assistant", "complete")]
    assert messages[1].content == expected and messages[0].content == question
    assert metrics.turn_takeovers_total._value.get() == before + 1
    # The dead owner cannot write any more (fenced), even if it were only paused.
    with pytest.raises(LeaseLost):
        handle.writer.emit({"type": "token", "text": "late"})
    turns_reconcile()  # nothing left to take over
    assert Message.objects.filter(conversation__session_id="orphan-turn-0001").count() == 2


@pytestmark_db
def test_a_reader_takes_over_without_waiting_for_the_reconciler(user, kb, fast_lease):
    from apps.conversations.models import Message
    from apps.conversations.services import turn_open

    handle = turn_open(user=user, session_id="reader-takeover-01", message="How do I request a refund?")
    die(handle)
    events = follow_all(handle.turn_id, after=1)  # a client that had the first event reconnects
    assert events[0][0] == 2 and events[-1][1]["type"] == "answer"
    assert Message.objects.get(turn_id=handle.turn_id, role="assistant").status == "complete"


@pytestmark_db
def test_after_answer_hooks_run_once_when_a_stalled_owner_and_the_taker_both_generate(user, kb, fast_lease,
                                                                                       monkeypatch):
    """The owner stalls inside generation past its lease (a long GC pause, a stopped VM); another instance
    takes the turn over and completes it. When the owner wakes up with its generated answer, it is fenced
    off and must not run the observation hooks a second time."""
    from apps.conversations import services
    from apps.conversations.hooks import register_turn_hook, unregister_turn_hook
    from apps.conversations.models import Message
    from apps.conversations.services import turn_execute, turn_open, turn_takeover

    real_get_generator = services.get_generator
    gate, stalled, calls = threading.Event(), threading.Event(), []

    class StallFirst:
        def __init__(self, inner):
            self.inner = inner

        def generate(self, **kw):
            calls.append(1)
            result = self.inner.generate(**{**kw, "on_token": lambda piece: None})
            if len(calls) == 1:  # the owner: stalls with its answer in hand
                stalled.set()
                assert gate.wait(30)
            else:
                for word in result.text.split(" "):
                    kw["on_token"](word + " ")
            return result

    monkeypatch.setattr(services, "get_generator", lambda name=None: StallFirst(real_get_generator(name)))
    answers = []

    def observe(stage, ctx):
        if stage == "after_answer":
            answers.append(ctx.answer)

    register_turn_hook(observe)
    try:
        handle = turn_open(user=user, session_id="stalled-owner-0001", message="How do I request a refund?")
        outcome = {}

        def owner():
            try:
                outcome["result"] = turn_execute(handle.spec, handle.writer, user=user)
            except LeaseLost as exc:
                outcome["lost"] = exc

        thread = threading.Thread(target=owner)
        thread.start()
        assert stalled.wait(30)
        die(handle)  # its heartbeats stop while it stalls
        time.sleep(1.2)
        assert turn_takeover(handle.turn_id)
        events = follow_all(handle.turn_id, takeover=False)
        assert events[-1][1]["type"] == "answer"
        gate.set()
        thread.join(30)
    finally:
        unregister_turn_hook(observe)
    assert "lost" in outcome and len(calls) == 2  # both generated; the owner was fenced off
    reply = Message.objects.get(pk=handle.message_id)
    assert reply.status == "complete"
    assert answers == [reply.content]  # once, with the saved answer


@pytestmark_db
def test_partial_answer_is_saved_as_it_is_generated(user, kb, settings, fast_lease):
    from apps.conversations.generators import generators_reset
    from apps.conversations.models import Message
    from apps.conversations.selectors import session_state_from_database
    from apps.conversations.services import turn_start
    from tests.conversations.slow_llm import SlowLLM

    llm = SlowLLM(delay=0.1, words=40)
    settings.GENERATOR, settings.LLM_BASE_URL, settings.TURN_PERSIST_SECONDS = "openai", llm.base_url, 0.1
    generators_reset()
    try:
        handle = turn_start(user=user, session_id="partial-save-0001", message="How do I request a refund?")
        deadline = time.monotonic() + 30
        while not (reply := Message.objects.get(pk=handle.message_id)).content and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reply.status == "streaming" and reply.content.startswith("Answer:")
        assert Message.objects.get(pk=handle.user_message_id).content == "How do I request a refund?"
        # The unfinished turn is not history yet: a follow-up elsewhere would not see half an answer.
        assert session_state_from_database(conversation=reply.conversation)["turns"] == []
        events = follow_all(handle.turn_id)
        reply.refresh_from_db()
        assert reply.status == "complete" and reply.content == llm.expected("How do I request a refund?")
        assert text_of(events).strip() == reply.content and len(llm.requests) == 1
    finally:
        llm.stop()


@pytestmark_db
def test_websocket_resume_frame_replays_from_an_offset(user, kb):
    from channels.testing import WebsocketCommunicator

    from apps.core.services import api_key_create
    from kotaemon_site.asgi import application
    import json

    raw = api_key_create(user=user).raw_key
    headers = [(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1"), (b"authorization", f"Bearer {raw}".encode())]

    async def run():
        comm = WebsocketCommunicator(application, "/ws/chat/resume-ws-0001/", headers=headers)
        assert (await comm.connect())[0]
        await comm.send_to(text_data=json.dumps({"type": "message", "message": "How do I request a refund?"}))
        first = []
        while not first or first[-1]["type"] not in ("answer", "error"):
            first.append(json.loads(await comm.receive_from(timeout=60)))
        await comm.disconnect()
        # A new socket (a reconnect, any instance) asks for the rest after offset 3; no turn id needed.
        comm = WebsocketCommunicator(application, "/ws/chat/resume-ws-0001/", headers=headers)
        assert (await comm.connect())[0]
        await comm.send_to(text_data=json.dumps({"type": "resume", "offset": 3}))
        rest = []
        while not rest or rest[-1]["type"] not in ("answer", "error"):
            rest.append(json.loads(await comm.receive_from(timeout=60)))
        await comm.send_to(text_data=json.dumps({"type": "resume", "turn_id": "f" * 32, "offset": 0}))
        missing = json.loads(await comm.receive_from(timeout=10))
        await comm.disconnect()
        return first, rest, missing

    first, rest, missing = asyncio.run(run())
    assert rest == first[3:] and rest[-1]["type"] == "answer"
    assert missing["type"] == "error" and missing["code"] == "turn_not_found"
