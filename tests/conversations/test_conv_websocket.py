"""Websocket chat: streaming, error frames, isolation, rate limit; in-process and against a real server."""
from __future__ import annotations

import asyncio
import json

import pytest
from channels.testing import WebsocketCommunicator

from apps.core.services import api_key_create

pytestmark = pytest.mark.django_db(transaction=True)


def application():
    from kotaemon_site.asgi import application

    return application


async def connect(user, session_id="conv-session-0001", **extra_headers):
    issued = await asyncio.to_thread(api_key_create, user=user)
    headers = [(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1"),
               (b"authorization", f"Bearer {issued.raw_key}".encode())]
    comm = WebsocketCommunicator(application(), f"/ws/chat/{session_id}/", headers=headers)
    connected, code = await comm.connect()
    return comm, connected, code


async def frames_until_answer(comm, timeout=60):
    frames = []
    while True:
        frame = json.loads(await comm.receive_from(timeout=timeout))
        frames.append(frame)
        if frame["type"] in ("answer", "error"):
            return frames


async def test_tokens_stream_then_one_answer(user, kb):
    comm, connected, _ = await connect(user)
    assert connected
    await comm.send_to(text_data=json.dumps({"type": "message", "message": "How do I request a refund?"}))
    frames = await frames_until_answer(comm)
    tokens = [f["text"] for f in frames if f["type"] == "token"]
    answer = frames[-1]
    assert answer["type"] == "answer" and len(tokens) > 3
    assert "".join(tokens).strip() == answer["answer"]
    assert set(answer) == {"type", "session_id", "message_id", "answer", "citations", "plugin_results", "usage",
                           "offset"}
    # Every frame of the answer carries its offset in the turn's event log: 1, 2, 3, ...
    assert frames[0]["type"] == "turn" and [f["offset"] for f in frames] == list(range(1, len(frames) + 1))
    assert answer["session_id"] == "conv-session-0001"
    assert answer["citations"][0]["url"].startswith("/sources/")
    # The follow-up on the same socket is contextualised with the first turn.
    await comm.send_to(text_data=json.dumps({"type": "message", "message": "and how long does that take?",
                                             "knowledge_bases": [kb.slug]}))
    assert "5 to 7 business days" in (await frames_until_answer(comm))[-1]["answer"]
    await comm.disconnect()


async def test_bad_frames_get_error_frames_and_the_connection_survives(user, kb):
    comm, connected, _ = await connect(user)
    assert connected
    cases = [
        ("{not json", "malformed_json"),
        (json.dumps([1, 2]), "invalid_frame"),
        (json.dumps({"type": "dance"}), "unknown_type"),
        (json.dumps({"message": "no type"}), "unknown_type"),
        (json.dumps({"type": "message", "message": "x" * (70 * 1024)}), "frame_too_large"),
        (json.dumps({"type": "message", "message": ""}), "message_required"),
        (json.dumps({"type": "message", "message": "hi", "knowledge_bases": ["nope"]}), "knowledge_base_not_found"),
    ]
    for text, code in cases:
        await comm.send_to(text_data=text)
        frame = json.loads(await comm.receive_from(timeout=30))
        assert frame["type"] == "error" and frame["code"] == code, (text[:40], frame)
        assert frame["message"]
    await comm.send_to(bytes_data=b"\x00\x01")
    assert json.loads(await comm.receive_from())["code"] == "bad_frame"
    await comm.send_to(text_data=json.dumps({"type": "ping"}))
    assert json.loads(await comm.receive_from()) == {"type": "pong"}
    await comm.send_to(text_data=json.dumps({"type": "message", "message": "How do I request a refund?"}))
    assert (await frames_until_answer(comm))[-1]["type"] == "answer"
    await comm.disconnect()


@pytest.mark.parametrize("session_id", ["short", "bad!session!id", "x" * 65])
async def test_bad_session_id_gets_an_error_frame_then_close(user, session_id):
    comm, connected, _ = await connect(user, session_id=session_id)
    assert connected
    frame = json.loads(await comm.receive_from())
    assert frame == {"type": "error", "code": "invalid_session_id", "message": frame["message"], "details": frame["details"]}
    closed = await comm.receive_output()
    assert closed["type"] == "websocket.close" and closed["code"] == 4400


async def test_cannot_stream_into_another_users_conversation(user, other_user, kb):
    from apps.conversations.models import Message
    from apps.conversations.services import chat_turn

    mine = await asyncio.to_thread(chat_turn, user=user, session_id="alice-private-1", message="refund")
    comm, connected, _ = await connect(other_user, session_id=mine.session_id)
    assert connected
    frame = json.loads(await comm.receive_from())
    assert frame["type"] == "error" and frame["code"] == "conversation_not_found"
    closed = await comm.receive_output()
    assert closed["type"] == "websocket.close" and closed["code"] == 4404
    assert await asyncio.to_thread(lambda: Message.objects.filter(conversation__session_id=mine.session_id).count()) == 2


async def test_anonymous_is_refused():
    comm = WebsocketCommunicator(application(), "/ws/chat/conv-session-0001/",
                                 headers=[(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1")])
    connected, code = await comm.connect()
    assert not connected and code == 4401


async def test_websocket_messages_share_the_chat_rate_limit(user, kb, monkeypatch):
    from rest_framework.throttling import SimpleRateThrottle

    from tests.conversations.conv_support import private_cache

    monkeypatch.setattr(SimpleRateThrottle, "THROTTLE_RATES", {"user": "1000/min", "chat": "1/min"})
    monkeypatch.setattr(SimpleRateThrottle, "cache", private_cache())
    comm, connected, _ = await connect(user)
    assert connected
    await comm.send_to(text_data=json.dumps({"type": "message", "message": "refund"}))
    assert (await frames_until_answer(comm))[-1]["type"] == "answer"
    await comm.send_to(text_data=json.dumps({"type": "message", "message": "refund"}))
    frame = json.loads(await comm.receive_from())
    assert frame["code"] == "throttled" and frame["details"]["retry_after_seconds"] > 0
    await comm.send_to(text_data=json.dumps({"type": "ping"}))
    assert json.loads(await comm.receive_from()) == {"type": "pong"}
    await comm.disconnect()


async def test_llm_unavailable_frame_carries_the_sources(user, kb, settings):
    from tests.helpers import free_port

    settings.GENERATOR = "openai"
    settings.LLM_BASE_URL = f"http://127.0.0.1:{free_port()}/v1"
    comm, connected, _ = await connect(user)
    assert connected
    await comm.send_to(text_data=json.dumps({"type": "message", "message": "How do I request a refund?"}))
    frame = (await frames_until_answer(comm))[-1]
    assert frame["type"] == "error" and frame["code"] == "llm_unavailable"
    assert frame["details"]["sources"][0]["document_title"] == "Refunds"
    assert frame["details"]["user_message_id"] > 0
    await comm.send_to(text_data=json.dumps({"type": "ping"}))
    assert json.loads(await comm.receive_from()) == {"type": "pong"}
    await comm.disconnect()


@pytest.mark.slow
def test_real_client_against_a_running_server(user, kb):
    """uvicorn in its own process and the `websockets` client: API key and session cookie."""
    import httpx
    from websockets.sync.client import connect as ws_connect

    from tests.helpers import asgi_server

    issued = api_key_create(user=user)
    with asgi_server() as (addr, _proc):
        with ws_connect(f"ws://{addr}/ws/chat/real-client-0001/", origin=f"http://{addr}",
                        additional_headers={"Authorization": f"Bearer {issued.raw_key}"}) as ws:
            ws.send("{broken")
            assert json.loads(ws.recv(timeout=30))["code"] == "malformed_json"
            ws.send(json.dumps({"type": "message", "message": "How do I request a refund?"}))
            frames = []
            while not frames or frames[-1]["type"] not in ("answer", "error"):
                frames.append(json.loads(ws.recv(timeout=120)))
            assert frames[0]["type"] == "turn" and frames[1]["type"] == "token" and frames[-1]["type"] == "answer"
            assert frames[-1]["citations"]
        # The same conversation over REST with a session cookie from a real login.
        with httpx.Client(base_url=f"http://{addr}") as http:
            http.get("/accounts/login/")
            http.post("/accounts/login/", data={"username": "alice", "password": "pw-alice-123",
                                                "csrfmiddlewaretoken": http.cookies["csrftoken"], "next": "/"},
                      headers={"Referer": f"http://{addr}/accounts/login/"})
            messages = http.get("/api/v1/conversations/real-client-0001/messages/").json()["results"]
            assert [m["role"] for m in messages] == ["user", "assistant"]
            cookie = "; ".join(f"{k}={v}" for k, v in http.cookies.items())
        with ws_connect(f"ws://{addr}/ws/chat/real-client-0001/", origin=f"http://{addr}",
                        additional_headers={"Cookie": cookie}) as ws:
            ws.send(json.dumps({"type": "message", "message": "and how long does that take?"}))
            frames = []
            while not frames or frames[-1]["type"] not in ("answer", "error"):
                frames.append(json.loads(ws.recv(timeout=120)))
            assert "5 to 7 business days" in frames[-1]["answer"]
