"""Fixtures for the knowledge Django layer. Nothing here is autouse: tests/knowledge/rag/ runs without Django.

Modules opt in with `pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("kb_env")]`.
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def embedding_model():
    """The real bundled all-MiniLM-L6-v2, loaded once per test session (about 2 s)."""
    from apps.knowledge.embeddings import embedder
    from apps.knowledge.rag.embedder import configure_threads

    configure_threads(1)
    model = embedder()
    model.warm_up()
    return model


@pytest.fixture
def kb_env(settings, tmp_path, embedding_model):
    """Index and media roots in a fresh temporary folder, tasks run inline, and the per-process index
    registry re-reads the active versions on every search (so a test sees its own activations)."""
    from apps.core import events
    from apps.knowledge.index_registry import registry
    from kotaemon_site.celery import app

    settings.INDEX_ROOT = tmp_path / "indexes"
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.KNOWLEDGE_VERSION_CHECK_SECONDS = 0
    settings.KNOWLEDGE_REBUILD_DELAY_SECONDS = 0
    # Tasks run inline even when the production variables point Celery at Redis: no worker runs here.
    eager = app.conf.task_always_eager
    app.conf.task_always_eager = True
    registry.clear()
    # Ids are reused across tests (rolled-back transactions): forget event versions seen for them.
    events._reset_for_tests()
    yield
    registry.clear()
    app.conf.task_always_eager = eager
    # Celery keeps "a task is running here" in one process-wide flag that each eager task sets and restores;
    # eager tasks run by concurrent threads (the concurrent-ingest tests) can leave it set, and every later
    # AsyncResult.get() in this process then raises "Never call result.get() within a task!".
    from celery._state import _set_task_join_will_block

    _set_task_join_will_block(False)


@pytest.fixture
def encode_counter(embedding_model, monkeypatch):
    """Counts texts actually sent to the model (wraps the real encode; nothing is faked)."""
    counter = {"texts": 0, "calls": 0}
    real = embedding_model.encode

    def counting(texts, *args, **kwargs):
        counter["texts"] += len(texts)
        counter["calls"] += 1
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(embedding_model, "encode", counting)
    return counter


@pytest.fixture
def make_kb(user):
    from apps.knowledge.models import KnowledgeBase

    def make(slug="kb", *, owner=user, public=False, groups=(), **fields):
        # A fixed model unless a test asks for the automatic choice (test_kb_model_choice.py): what most tests
        # check does not depend on the model, and they should not re-embed when their text is Chinese.
        fields.setdefault("embedding_model_auto", False)
        kb = KnowledgeBase.objects.create(slug=slug, name=slug.replace("-", " ").title(), owner=owner,
                                          is_public=public, **fields)
        if groups:
            kb.allowed_groups.set(groups)
        return kb

    return make


@pytest.fixture
def load_docs():
    """Import {name: bytes} into a knowledge base, ingest synchronously and activate a new index."""
    from apps.knowledge import services

    def load(kb, files: dict[str, bytes]):
        outcomes = [services.document_import(knowledge_base=kb, user=kb.owner, name=name, data=data).document
                    for name, data in files.items()]
        results = services.documents_ingest(document_ids=[d.pk for d in outcomes], rebuild=False)
        build = services.index_rebuild(knowledge_base_id=kb.pk)
        return {d.source_name: r for d, r in zip(outcomes, results)}, build

    return load
