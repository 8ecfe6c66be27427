"""The OpenAI-compatible API (/v1/), driven by the official `openai` Python client.

In-process tests run the client over httpx's WSGI transport (same thread, same test transaction);
the streaming test runs it against a real uvicorn.
"""
from __future__ import annotations

import httpx
import openai
import pytest
from django.core.handlers.wsgi import WSGIHandler

from apps.core.services import api_key_create
from tests.conversations.conv_support import SECURITY_MD, build_knowledge_base, private_cache

pytestmark = pytest.mark.django_db


def client_for(raw_key: str, **kw) -> openai.OpenAI:
    http = httpx.Client(transport=httpx.WSGITransport(app=WSGIHandler()), base_url="http://testserver")
    return openai.OpenAI(api_key=raw_key, base_url="http://testserver/v1", http_client=http, max_retries=0, **kw)


@pytest.fixture(autouse=True)
def _keep_test_connection():
    """WSGIHandler closes the database connection after each request (request_finished); the test
    transaction lives on it. Django's own test client disconnects the handler the same way."""
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def key(user):
    return api_key_create(user=user).raw_key


def test_models_are_the_readable_knowledge_bases_plus_one_for_all(user, other_user, kb, key):
    build_knowledge_base(other_user, slug="bobs-private", docs={"security.md": SECURITY_MD})
    build_knowledge_base(other_user, slug="public-handbook", docs={"security.md": SECURITY_MD}, public=True)
    oa = client_for(key)
    ids = [m.id for m in oa.models.list()]
    assert ids == sorted([kb.slug, "public-handbook"]) + ["kotaemon-all"]
    assert oa.models.retrieve(kb.slug).owned_by == "kotaemon-site"
    with pytest.raises(openai.NotFoundError) as err:
        oa.models.retrieve("bobs-private")  # exists, but not readable: the same answer as a missing one
    assert err.value.code == "model_not_found" and err.value.body["type"] == "invalid_request_error"


def test_completion_cites_and_continues_the_conversation(user, kb, key):
    from apps.conversations.models import Conversation, Message

    oa = client_for(key)
    first = oa.chat.completions.with_raw_response.create(
        model=kb.slug, messages=[{"role": "user", "content": "How do I request a refund?"}])
    completion = first.parse()
    answer = completion.choices[0].message.content
    assert "Request refund" in answer and "[1]" in answer
    assert completion.choices[0].finish_reason == "stop" and completion.object == "chat.completion"
    ext = completion.model_extra["kotaemon"]
    assert ext["citations"][0]["n"] == 1 and ext["citations"][0]["url"].startswith("/sources/")
    assert completion.usage.completion_tokens > 0 and completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    session = first.headers["x-session-id"]
    assert session == ext["session_id"]

    # Continue explicitly by session id (header)...
    follow = oa.chat.completions.create(model=kb.slug, extra_headers={"X-Session-ID": session},
                                        messages=[{"role": "user", "content": "and how long does that take?"}])
    assert "5 to 7 business days" in follow.choices[0].message.content
    assert follow.model_extra["kotaemon"]["session_id"] == session
    # ...or as chat UIs do: resend the dialogue; the last answer names the conversation.
    again = oa.chat.completions.create(model="kotaemon-all", messages=[
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "How do I request a refund?"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "and how long does that take?"}])
    assert again.model_extra["kotaemon"]["session_id"] == session
    assert Message.objects.filter(conversation__session_id=session).count() == 6
    assert Conversation.objects.filter(owner=user).count() == 1
    # metadata.session_id works too, and a new id starts a new conversation.
    other = oa.chat.completions.create(model=kb.slug, metadata={"session_id": "openai-meta-0001"},
                                       messages=[{"role": "user", "content": "How do I request a refund?"}])
    assert other.model_extra["kotaemon"]["session_id"] == "openai-meta-0001"


def test_errors_have_the_openai_shape(user, other_user, kb, key, monkeypatch):
    with pytest.raises(openai.AuthenticationError) as err:
        client_for("ksk_not-a-real-key").models.list()
    assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
    assert set(err.value.body) == {"message", "type", "param", "code"}
    oa = client_for(key)
    with pytest.raises(openai.NotFoundError) as err:
        oa.chat.completions.create(model="no-such-base", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        oa.chat.completions.create(model=kb.slug, messages=[{"role": "assistant", "content": "hi"}])
    assert err.value.body["param"] == "messages" and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        oa.chat.completions.create(model=kb.slug, messages=[{"role": "user", "content": " "}])
    assert err.value.code == "message_required" and err.value.body["param"] == "messages"
    # Another user's conversation id is not found, as everywhere else in the chat.
    theirs = api_key_create(user=other_user).raw_key
    client_for(theirs).chat.completions.create(model="kotaemon-all", metadata={"session_id": "bob-session-01"},
                                               messages=[{"role": "user", "content": "refund"}])
    with pytest.raises(openai.NotFoundError) as err:
        oa.chat.completions.create(model=kb.slug, metadata={"session_id": "bob-session-01"},
                                   messages=[{"role": "user", "content": "refund"}])
    assert err.value.code == "conversation_not_found"
    # The chat rate limit is the same as REST's (per API key).
    from rest_framework.throttling import SimpleRateThrottle

    monkeypatch.setattr(SimpleRateThrottle, "THROTTLE_RATES", {"user": "1000/min", "chat": "1/min"})
    monkeypatch.setattr(SimpleRateThrottle, "cache", private_cache())
    oa.chat.completions.create(model=kb.slug, messages=[{"role": "user", "content": "refund"}])
    with pytest.raises(openai.RateLimitError) as err:
        oa.chat.completions.create(model=kb.slug, messages=[{"role": "user", "content": "refund"}])
    assert err.value.code == "throttled" and err.value.body["type"] == "rate_limit_error"
    assert int(err.value.response.headers["retry-after"]) > 0


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_streaming_with_the_openai_client_and_rest_sse_against_uvicorn(user, kb):
    import json

    from tests.helpers import asgi_server

    raw = api_key_create(user=user).raw_key
    with asgi_server() as (addr, _proc):
        oa = openai.OpenAI(api_key=raw, base_url=f"http://{addr}/v1", max_retries=0)
        chunks = list(oa.chat.completions.create(model=kb.slug, stream=True, stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "How do I request a refund?"}]))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        final = next(c for c in chunks if c.choices and c.choices[0].finish_reason == "stop")
        ext = final.model_extra["kotaemon"]
        assert text.strip() == ext["answer"] and "[1]" in text and ext["citations"]
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # streamed, not one piece
        assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices
        assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")

        # REST: POST /api/v1/chat/ with "stream": true, then resume from an offset with Last-Event-ID.
        headers = {"Authorization": f"Bearer {raw}"}
        with httpx.Client(base_url=f"http://{addr}", headers=headers, timeout=60) as http:
            events = sse_events(http.stream("POST", "/api/v1/chat/", json={
                "message": "and how long does that take?", "session_id": ext["session_id"], "stream": True}))
            kinds = [e["event"] for e in events]
            assert kinds[0] == "turn" and kinds[-1] == "answer" and kinds.count("token") > 3
            answer = json.loads(events[-1]["data"])
            assert "5 to 7 business days" in answer["answer"]
            assert set(answer) == {"session_id", "message_id", "answer", "citations", "plugin_results", "usage"}
            assert "".join(json.loads(e["data"])["text"] for e in events if e["event"] == "token").strip() == \
                answer["answer"]
            turn_id = json.loads(events[0]["data"])["turn_id"]
            cut = int(events[3]["id"])
            rest = sse_events(http.stream("GET", f"/api/v1/chat/turns/{turn_id}/events/",
                                          headers={"Last-Event-ID": str(cut)}))
            assert [e["id"] for e in rest] == [e["id"] for e in events[4:]]  # exactly the rest, nothing twice
            # Accept: text/event-stream works too; errors before the stream are ordinary HTTP errors.
            bad = http.post("/api/v1/chat/", json={"message": ""}, headers={"Accept": "text/event-stream"})
            assert bad.status_code == 400 and "event: error" in bad.text
            other = http.get(f"/api/v1/chat/turns/{'0' * 32}/events/")
            assert other.status_code == 404 and other.json()["error"]["code"] == "turn_not_found"


def sse_events(stream_cm) -> list[dict[str, str]]:
    events, current = [], {}
    with stream_cm as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if current:
                    events.append(current)
                current = {}
                continue
            field, _, value = line.partition(": ")
            current[field] = current.get(field, "") + value if field == "data" else value
    return events
