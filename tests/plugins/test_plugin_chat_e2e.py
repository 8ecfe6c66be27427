"""End to end through chat_turn: a sandboxed plugin's result and a knowledge chunk feed one answer and are
both cited; a failing plugin leaves the turn answering from knowledge alone."""
from __future__ import annotations

import uuid

import pytest

from apps.conversations.services import chat_turn
from apps.plugins.models import PluginInvocation
from tests.plugins.order_service import order_service

pytestmark = [pytest.mark.django_db, pytest.mark.slow]

SHIPPING_MD = """# Shipping and delivery

## Delivery times

Standard delivery takes 3 business days in mainland Europe.

## Delays

When a parcel is delayed by the carrier, customers receive a voucher worth 10 percent of the order.
Delays caused by customs are not covered by the voucher policy.
"""

SECURITY_MD = """# Office security

## Badges

Every employee must wear a visible badge inside the office building.
"""


@pytest.fixture
def kb(user, settings, tmp_path):
    from apps.knowledge.index_registry import registry
    from apps.knowledge.models import KnowledgeBase
    from apps.knowledge.services import document_import, documents_ingest, index_rebuild

    # Fresh index/media roots, and the process's index registry re-reads active versions every search.
    settings.INDEX_ROOT = tmp_path / "indexes"
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.KNOWLEDGE_VERSION_CHECK_SECONDS = 0
    registry.clear()
    kb = KnowledgeBase.objects.create(slug=f"kb-{uuid.uuid4().hex[:8]}", name="Support", owner=user)
    ids = [document_import(knowledge_base=kb, user=user, name=name, data=text.encode(),
                           title=name.split(".")[0].title()).document.pk
           for name, text in {"shipping.md": SHIPPING_MD, "security.md": SECURITY_MD}.items()]
    assert all(r.status == "ready" for r in documents_ingest(document_ids=ids, rebuild=False))
    index_rebuild(knowledge_base_id=kb.pk)
    yield kb
    registry.clear()


@pytest.fixture
def fresh_conversations():
    from apps.conversations.generators import generators_reset
    from apps.conversations.session_store import session_store_reset

    session_store_reset()
    generators_reset()
    yield
    session_store_reset()
    generators_reset()


def test_order_status_and_delay_policy_are_both_cited(plugins_dir, enable, user, kb, fresh_conversations):
    with order_service() as orders:
        enable("order_query", allowed_hosts=[orders.host], config={"base_url": orders.url})
        result = chat_turn(user=user, session_id=None,
                           message="where's my stuff? and what do I get when a parcel is delayed?")
        assert orders.requests and orders.requests[0]["path"] == f"/users/{user.pk}/orders"
    by_type = {c["type"]: c for c in result.citations}
    assert set(by_type) == {"plugin", "chunk"}, result.citations
    plugin = by_type["plugin"]
    assert plugin["plugin"] == "order_query" and plugin["title"] == "Your recent orders (order service)"
    assert "A1001" in plugin["snippet"] and "carrier backlog" in plugin["snippet"]
    assert plugin["url"] == "https://track.example.com/A1001"
    chunk = by_type["chunk"]
    assert chunk["document_title"] == "Shipping" and "voucher" in chunk["snippet"]
    assert f"[{plugin['n']}]" in result.answer and f"[{chunk['n']}]" in result.answer
    assert "voucher" in result.answer and "A1001" in result.answer
    assert result.plugin_results[0]["ok"] and result.plugin_results[0]["intent"] == "query_order"
    record = PluginInvocation.objects.get(plugin="order_query")
    assert record.outcome == "ok" and record.intent == "query_order" and record.confidence >= 0.4


def test_general_question_is_answered_by_plain_rag(plugins_dir, enable, user, kb, fresh_conversations):
    with order_service() as orders:
        enable("order_query", allowed_hosts=[orders.host], config={"base_url": orders.url})
        result = chat_turn(user=user, session_id=None, message="what does the policy say about customs delays?")
        assert orders.requests == []
    assert result.plugin_results == [] and {c["type"] for c in result.citations} == {"chunk"}


def test_a_hanging_plugin_does_not_stop_the_answer(plugins_dir, enable, user, kb, fresh_conversations):
    enable("sleeper", timeout_seconds=0.5)
    result = chat_turn(user=user, session_id=None, message="sleep it; what happens when a parcel is delayed?")
    assert "voucher" in result.answer and {c["type"] for c in result.citations} == {"chunk"}
    assert result.plugin_results[0]["ok"] is False and result.plugin_results[0]["error_code"] == "timeout"
    assert PluginInvocation.objects.get(plugin="sleeper").outcome == "timeout"
