"""Shared pieces of the conversation tests: a real knowledge base built with the real ingestion."""
from __future__ import annotations

import uuid

REFUNDS_MD = """# Returns and refunds

## Requesting a refund

To request a refund, open the order page in your account and click Request refund.
Refunds are processed within 5 to 7 business days after the warehouse receives the returned item.
Shipping costs are not refunded unless the item arrived damaged.

## Exchanges

Items can be exchanged for a different size within 30 days of delivery.
"""

SHIPPING_MD = """# Shipping and delivery

## Delivery times

Standard delivery takes 3 business days in mainland Europe.
Express delivery arrives the next business day and costs 9 euros.

## Delays

When a parcel is delayed by the carrier, customers receive a voucher worth 10 percent of the order.
Delays caused by customs are not covered by the voucher policy.
"""

SECURITY_MD = """# Office security

## Badges

Every employee must wear a visible badge inside the office building.
Lost badges are reported to the security desk, which issues a replacement within one hour.
"""


def build_knowledge_base(owner, *, slug: str | None = None, docs: dict[str, str] | None = None, public: bool = False):
    """Create a knowledge base and ingest `docs` (name -> markdown) synchronously with the real pipeline."""
    from apps.knowledge.models import KnowledgeBase
    from apps.knowledge.services import document_import, documents_ingest, index_rebuild

    kb = KnowledgeBase.objects.create(slug=slug or f"kb-{uuid.uuid4().hex[:8]}", name=(slug or "Support").title(),
                                      owner=owner, is_public=public)
    docs = docs if docs is not None else {"refunds.md": REFUNDS_MD, "shipping.md": SHIPPING_MD}
    ids = []
    for name, text in docs.items():
        outcome = document_import(knowledge_base=kb, user=owner, name=name, data=text.encode(),
                                  title=name.rsplit(".", 1)[0].title())
        ids.append(outcome.document.pk)
    results = documents_ingest(document_ids=ids, rebuild=False)
    assert all(r.status == "ready" for r in results), [(r.name, r.status, r.error_code) for r in results]
    index_rebuild(knowledge_base_id=kb.pk)
    return kb


def reset_conversation_runtime() -> None:
    from apps.conversations.generators import generators_reset
    from apps.conversations.session_store import session_store_reset
    from apps.conversations.turn_stream import turn_stream_reset

    session_store_reset()
    turn_stream_reset()
    generators_reset()


def private_cache():
    """A private cache for rate-limit counters: the shared test Redis is cleared by every other test
    run on the machine, which would reset a counter between two requests of one test."""
    from django.core.cache.backends.locmem import LocMemCache

    return LocMemCache(f"throttle-{uuid.uuid4().hex}", {})
