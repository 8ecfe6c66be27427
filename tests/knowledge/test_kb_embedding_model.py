"""The embedding model as a setting of each knowledge base: recorded in every index version, re-embedded
in the background on a change, old version (and old query model) served until the new one is active."""
from __future__ import annotations

import numpy as np
import pytest

from apps.core.errors import ApplicationError
from apps.knowledge import selectors, services
from apps.knowledge.embeddings import MODEL_E5, MODEL_MINILM, embedder, query_encoder_for
from apps.knowledge.index_registry import registry
from apps.knowledge.models import Chunk, IndexVersion

from . import kb_files

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("kb_env")]


def test_changing_the_model_reembeds_in_the_background_and_swaps(make_kb, load_docs, user,
                                                                   django_capture_on_commit_callbacks):
    kb = make_kb(embedding_model=MODEL_MINILM)
    load_docs(kb, {"expenses.md": kb_files.MARKDOWN, "fire.txt": kb_files.TEXT})
    minilm, e5 = embedder(MODEL_MINILM), embedder(MODEL_E5)
    v1 = IndexVersion.objects.get(knowledge_base=kb, status="active")
    assert (v1.embedding_key, v1.embedding_model, v1.embedding_dimension) == (MODEL_MINILM, minilm.model_id, 384)
    assert registry.bundle(kb.pk).embedding == {**minilm.describe(), "dimension": 384}

    # The change commits; the re-embed is queued after commit and has not run yet: searches are unchanged.
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.knowledge_base_update(user=user, knowledge_base=kb, embedding_model=MODEL_E5)
    hits = selectors.chunks_retrieve(user=user, query="where do we meet during a fire drill", mode="dense")
    assert hits and {h.index_version for h in hits} == {v1.version}
    assert query_encoder_for(registry.bundle(kb.pk).embedding) is minilm  # the old model encodes the query

    for callback in callbacks:  # the background build (Celery runs inline in tests)
        callback()
    v2 = IndexVersion.objects.get(knowledge_base=kb, status="active")
    assert v2.version > v1.version and v2.embedding_key == MODEL_E5 and v2.embedding_model == e5.model_id
    chunks = list(Chunk.objects.filter(document__knowledge_base=kb, superseded_at__isnull=True))
    assert v2.encode_total == v2.encoded_count == len(chunks) > 0  # the progress shown in the admin
    assert {c.embedding_model for c in chunks} == {e5.model_id}
    bundle = registry.bundle(kb.pk)
    assert bundle.version == v2.version and bundle.embedding["model_id"] == e5.model_id
    # every vector of the new version is the new model's: two models never share a version
    stored = bundle.vectors([c.pk for c in chunks])
    from apps.knowledge.rag.chunker import indexed_text

    fresh = e5.encode_passages([indexed_text(c.text, c.search_context) for c in chunks])  # what is embedded
    assert np.allclose(stored, fresh, atol=1e-5)
    hits = selectors.chunks_retrieve(user=user, query="where do we meet during a fire drill", mode="dense")
    assert {h.index_version for h in hits} == {v2.version} and "north parking lot" in hits[0].text
    assert query_encoder_for(bundle.embedding) is e5


def test_a_version_is_never_searched_with_another_models_query_vectors(make_kb, load_docs, user):
    kb = make_kb(embedding_model=MODEL_MINILM)
    load_docs(kb, {"fire.txt": kb_files.TEXT})
    bundle = registry.bundle(kb.pk)
    from apps.knowledge.rag.errors import QueryModelMismatch

    with pytest.raises(QueryModelMismatch):
        bundle.dense_search(embedder(MODEL_E5).encode_query("fire"), 3, model_id=embedder(MODEL_E5).model_id)
    # a version whose model this installation cannot run answers from BM25 only
    assert query_encoder_for({"model_id": "gone-model@0000", "model": "gone"}) is None


def test_unknown_models_are_refused(make_kb, user):
    kb = make_kb()
    with pytest.raises(ApplicationError) as error:
        services.knowledge_base_update(user=user, knowledge_base=kb, embedding_model="/etc/passwd")
    assert error.value.code == "validation_error"
    assert "embedding_model" in error.value.details["fields"]
