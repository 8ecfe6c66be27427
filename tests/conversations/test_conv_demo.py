"""The demo path: after `demo_setup`, a newcomer signs in and gets a cited answer from the sample knowledge base."""
from __future__ import annotations

import pytest

from tests.conversations.conv_support import reset_conversation_runtime

pytestmark = [pytest.mark.django_db, pytest.mark.slow]


@pytest.mark.parametrize("question,expected", [
    ("How many days do I have to return an item?", ["30 days"]),
    # Which sentences answer depends on the fused ranking; any of them is a correct, cited answer.
    ("How do I start a return?", ["select the items", "Orders", "return label", "drop off in store", "returns"]),
])
def test_newcomer_gets_a_cited_answer_from_the_sample_knowledge_base(client, django_user_model, question, expected):
    from django.core.management import call_command

    reset_conversation_runtime()
    call_command("demo_setup", "--username", "admin", "--password", "admin-pw-demo", stdout=open("/dev/null", "w"))
    django_user_model.objects.create_user(username="newcomer", password="pw-newcomer-1")
    assert client.post("/accounts/login/", {"username": "newcomer", "password": "pw-newcomer-1"}).status_code == 302
    assert client.get("/").status_code == 200
    body = client.post("/api/v1/chat/", {"message": question}, content_type="application/json").json()
    assert any(phrase in body["answer"] for phrase in expected), body
    assert any("Return" in c["document_title"] for c in body["citations"]), body["citations"]
    assert body["citations"] and body["citations"][0]["url"].startswith("/sources/")
    assert body["citations"][0]["document_title"]
    assert client.get(body["citations"][0]["url"]).status_code == 200
