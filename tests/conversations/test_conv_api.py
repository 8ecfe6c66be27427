"""REST API of conversations: chat, list/read/rename/archive/delete, messages, feedback, limits."""
from __future__ import annotations

import pytest

from apps.conversations.models import Conversation, Feedback
from apps.core.services import api_key_create
from tests.conversations.conv_support import build_knowledge_base, private_cache

pytestmark = pytest.mark.django_db


def ask(client, message, **extra):
    return client.post("/api/v1/chat/", {"message": message, **extra}, format="json")


def test_chat_response_shape_and_follow_up(auth_client, kb):
    resp = ask(auth_client, "How do I request a refund?")
    assert resp.status_code == 200, resp.json()
    body = resp.json()
    assert set(body) == {"session_id", "message_id", "answer", "citations", "plugin_results", "usage"}
    citation = body["citations"][0]
    assert set(citation) >= {"n", "type", "document_id", "document_title", "chunk_id", "page", "heading", "snippet",
                             "score", "url"}
    assert f"[{citation['n']}]" in body["answer"]
    assert body["usage"]["generator"] == "extractive" and body["usage"]["latency_ms"] > 0
    again = ask(auth_client, "and how long does that take?", session_id=body["session_id"]).json()
    assert again["session_id"] == body["session_id"] and "5 to 7 business days" in again["answer"]


def test_knowledge_base_filter_by_slug(auth_client, kb, user):
    other = build_knowledge_base(user, docs={"security.md": __import__(
        "tests.conversations.conv_support", fromlist=["SECURITY_MD"]).SECURITY_MD})
    body = ask(auth_client, "How long does a refund take?", knowledge_bases=[other.slug]).json()
    assert all(c["document_title"] == "Security" for c in body["citations"])
    body = ask(auth_client, "How long does a refund take?", knowledge_bases=[kb.slug]).json()
    assert body["citations"] and all(c["document_title"] == "Refunds" for c in body["citations"])


@pytest.mark.parametrize("payload,code", [
    ({}, "validation_error"),
    ({"message": ""}, "validation_error"),
    ({"message": "x" * 8001}, "message_too_long"),
    ({"message": "hi", "session_id": "../etc"}, "invalid_session_id"),
    ({"message": "hi", "knowledge_bases": "all"}, "validation_error"),
    ({"message": "hi", "knowledge_bases": ["missing"]}, "knowledge_base_not_found"),
])
def test_bad_chat_requests(auth_client, payload, code):
    resp = auth_client.post("/api/v1/chat/", payload, format="json")
    assert 400 <= resp.status_code < 500
    assert resp.json()["error"]["code"] == code


def test_malformed_json_is_a_parse_error(auth_client):
    resp = auth_client.post("/api/v1/chat/", "{not json", content_type="application/json")
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "parse_error"


def test_anonymous_is_refused(api_client):
    resp = ask(api_client, "hi")
    assert resp.status_code in (401, 403) and resp.json()["error"]["code"] == "not_authenticated"


def test_conversation_lifecycle(auth_client, kb):
    sid = ask(auth_client, "How do I request a refund?").json()["session_id"]
    listing = auth_client.get("/api/v1/conversations/").json()
    assert listing["count"] == 1
    assert listing["results"][0]["session_id"] == sid and listing["results"][0]["message_count"] == 2
    detail = auth_client.get(f"/api/v1/conversations/{sid}/").json()
    assert detail["title"] == "How do I request a refund?"
    assert auth_client.patch(f"/api/v1/conversations/{sid}/", {"title": "Refunds"}, format="json").json()["title"] == "Refunds"
    assert auth_client.patch(f"/api/v1/conversations/{sid}/", {"title": "  "}, format="json").json()["error"]["code"] == "invalid_title"
    messages = auth_client.get(f"/api/v1/conversations/{sid}/messages/").json()["results"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["citations"]
    auth_client.patch(f"/api/v1/conversations/{sid}/", {"archived": True}, format="json")
    assert auth_client.get("/api/v1/conversations/").json()["count"] == 0
    assert auth_client.get("/api/v1/conversations/?archived=true").json()["count"] == 1
    assert auth_client.get("/api/v1/conversations/?archived=maybe").json()["error"]["code"] == "invalid_parameter"
    assert ask(auth_client, "more?", session_id=sid).json()["error"]["code"] == "conversation_archived"
    assert auth_client.delete(f"/api/v1/conversations/{sid}/").status_code == 204
    assert not Conversation.objects.filter(session_id=sid).exists()
    assert auth_client.get(f"/api/v1/conversations/{sid}/").status_code == 404


def test_feedback(auth_client, kb, user):
    body = ask(auth_client, "How do I request a refund?").json()
    url = f"/api/v1/messages/{body['message_id']}/feedback/"
    assert auth_client.post(url, {"rating": "up"}, format="json").status_code == 200
    resp = auth_client.post(url, {"rating": "down", "comment": "too short"}, format="json")
    assert resp.json()["rating"] == "down"
    fb = Feedback.objects.get()
    assert (fb.rating, fb.comment, fb.user) == ("down", "too short", user)
    assert auth_client.post(url, {"rating": "meh"}, format="json").json()["error"]["code"] == "validation_error"
    user_message_id = body["message_id"] - 1
    resp = auth_client.post(f"/api/v1/messages/{user_message_id}/feedback/", {"rating": "up"}, format="json")
    assert resp.json()["error"]["code"] == "feedback_not_allowed"
    messages = auth_client.get(f"/api/v1/conversations/{body['session_id']}/messages/").json()["results"]
    assert messages[1]["feedback"] == "down"


def test_users_never_see_each_others_conversations(api_client, user, other_user, kb):
    api_client.force_authenticate(user)
    body = ask(api_client, "How do I request a refund?").json()
    sid, message_id = body["session_id"], body["message_id"]
    api_client.force_authenticate(other_user)
    for method, url, data in [
        ("get", f"/api/v1/conversations/{sid}/", None),
        ("patch", f"/api/v1/conversations/{sid}/", {"title": "mine now"}),
        ("delete", f"/api/v1/conversations/{sid}/", None),
        ("get", f"/api/v1/conversations/{sid}/messages/", None),
        ("post", f"/api/v1/messages/{message_id}/feedback/", {"rating": "down"}),
        ("post", "/api/v1/chat/", {"message": "and then?", "session_id": sid}),
    ]:
        resp = getattr(api_client, method)(url, data, format="json")
        assert resp.status_code == 404, (method, url, resp.status_code)
        assert resp.json()["error"]["code"] in ("conversation_not_found", "message_not_found")
    assert api_client.get("/api/v1/conversations/").json()["count"] == 0
    conversation = Conversation.objects.get(session_id=sid)
    assert conversation.title == "How do I request a refund?" and conversation.messages.count() == 2
    assert not Feedback.objects.exists()


@pytest.fixture
def chat_rate(monkeypatch):
    """Set the chat limit for one test; monkeypatch restores the class-level rates afterwards."""
    from rest_framework.throttling import SimpleRateThrottle

    def set_rate(rate: str) -> None:
        monkeypatch.setattr(SimpleRateThrottle, "THROTTLE_RATES", {"user": "1000/min", "chat": rate})
        # A private counter store: the shared test Redis is cleared by every other test run on this machine.
        monkeypatch.setattr(SimpleRateThrottle, "cache", private_cache())
    return set_rate



def test_chat_rate_limit_per_user(auth_client, chat_rate, kb):
    chat_rate("3/min")
    codes = [ask(auth_client, "refund").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    resp = ask(auth_client, "refund")
    assert resp.json()["error"]["code"] == "throttled"
    assert int(resp["Retry-After"]) > 0 and resp.json()["error"]["details"]["retry_after_seconds"] > 0
    # Other endpoints keep working: the chat limit is its own scope.
    assert auth_client.get("/api/v1/conversations/").status_code == 200


def test_chat_rate_limit_per_api_key(api_client, user, chat_rate, kb):
    chat_rate("2/min")
    key_a, key_b = api_key_create(user=user, name="a").raw_key, api_key_create(user=user, name="b").raw_key
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {key_a}")
    assert [ask(api_client, "refund").status_code for _ in range(3)] == [200, 200, 429]
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {key_b}")  # each key has its own budget
    assert ask(api_client, "refund").status_code == 200


def test_openapi_schema_documents_the_chat_api(api_client, staff_user):
    api_client.force_authenticate(staff_user)
    resp = api_client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert resp.status_code == 200
    import json as _json

    schema = _json.loads(resp.content)
    paths = schema["paths"]
    for path in ["/api/v1/chat/", "/api/v1/conversations/", "/api/v1/conversations/{session_id}/",
                 "/api/v1/conversations/{session_id}/messages/", "/api/v1/messages/{message_id}/feedback/"]:
        assert path in paths, path
    chat = paths["/api/v1/chat/"]["post"]
    assert {"200", "429", "503"} <= set(chat["responses"])
    response_schema = schema["components"]["schemas"]["ChatResponse"]
    assert set(response_schema["properties"]) == {"session_id", "message_id", "answer", "citations",
                                                  "plugin_results", "usage"}
