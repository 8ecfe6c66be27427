"""Data migrations of the knowledge app, run backwards and forwards on the test database."""
from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("knowledge", "0009_kb_automatic_embedding_model")]
AFTER = [("knowledge", "0010_kb_fusion_auto")]


def _migrate(targets):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


def test_bases_on_the_old_default_fusion_follow_the_measured_default(django_user_model):
    owner = django_user_model.objects.create_user(username="owner", password="pw-owner-123")
    try:
        old = _migrate(BEFORE)
        KnowledgeBase = old.get_model("knowledge", "KnowledgeBase")
        for slug, fusion, k, calibration in [("untouched", "rrf", 60, {}), ("calibrated", "rrf", 60, {"source": "x"}),
                                             ("k20", "rrf", 20, {}), ("tuned", "zscore", 60, {})]:
            KnowledgeBase.objects.create(slug=slug, name=slug, owner_id=owner.pk, fusion=fusion, rrf_k=k,
                                         retrieval_calibration=calibration)
        new = _migrate(AFTER)
        fusions = dict(new.get_model("knowledge", "KnowledgeBase").objects.values_list("slug", "fusion"))
        assert fusions == {"untouched": "auto", "calibrated": "rrf", "k20": "rrf", "tuned": "zscore"}
        back = _migrate(BEFORE)
        assert back.get_model("knowledge", "KnowledgeBase").objects.get(slug="untouched").fusion == "rrf"
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())
