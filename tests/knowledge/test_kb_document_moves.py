"""Finding 3 (issue 10): a document moved from a public base to a private one stayed searchable in the old
base for every reader. Moves (REST and admin form) now re-index both bases, and retrieval drops any hit
whose document is not, now, in a base being searched, even from a stale index version."""
from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from apps.knowledge.index_registry import registry
from apps.knowledge.models import Document, IndexVersion
from apps.knowledge.selectors import chunks_retrieve

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("kb_env")]

SECRET = b"# Salaries\n\nThe salary band for principal engineers is confidential: 180k to 240k.\n"
PUBLIC = b"# Canteen\n\nThe canteen opens at eight and serves lunch until two.\n"
QUERY = "salary band principal engineers"


@pytest.fixture
def bases(make_kb, load_docs, user, other_user):
    public = make_kb("open", owner=user, public=True)
    private = make_kb("hr-private", owner=user)
    load_docs(public, {"salaries.md": SECRET, "canteen.md": PUBLIC})
    load_docs(private, {"canteen.md": PUBLIC})
    return public, private


def _client(user):
    client = APIClient()
    client.force_authenticate(user)
    return client


def _titles(results):
    return {(r.knowledge_base_slug, r.document_title) for r in results}


def test_moved_document_is_not_served_from_the_stale_index_of_its_old_base(bases, user, other_user):
    public, private = bases
    doc = Document.objects.get(knowledge_base=public, source_name="salaries.md")
    assert ("open", "Salaries") in _titles(chunks_retrieve(user=other_user, query=QUERY, top_k=5))
    stale = registry.bundle(public.pk).version

    # The move commits, but (inside this test's transaction) no on-commit task runs: the old base's active
    # index version still holds the document's chunks, as on any instance before the rebuild lands.
    response = _client(user).patch(f"/api/v1/documents/{doc.pk}/", {"knowledge_base": private.slug}, format="json")
    assert response.status_code == 200 and response.json()["knowledge_base"] == "hr-private"
    assert registry.bundle(public.pk).version == stale
    moved_chunks = set(doc.chunks.values_list("pk", flat=True))
    assert moved_chunks & {chunk_id for chunk_id, _ in registry.bundle(public.pk).bm25_search(QUERY, 10)}

    # Attack: a reader of the public base searches for the moved document (ranking cached or not).
    for _ in range(2):
        results = chunks_retrieve(user=other_user, query=QUERY, top_k=5)
        assert all(r.document_id != doc.pk for r in results), _titles(results)
        assert all(r.knowledge_base_slug == "open" for r in results)
    # Naming the old base explicitly does not help either.
    assert all(r.document_id != doc.pk for r in chunks_retrieve(user=other_user, query=QUERY, knowledge_bases=["open"]))
    # The owner, who may read both, still cannot get it out of the old base's index: only from its new base.
    assert all(r.document_id != doc.pk for r in chunks_retrieve(user=user, query=QUERY, knowledge_bases=["open"]))


def test_move_reindexes_both_bases(bases, user, other_user, django_capture_on_commit_callbacks):
    public, private = bases
    doc = Document.objects.get(knowledge_base=public, source_name="salaries.md")
    before = {kb.pk: IndexVersion.objects.get(knowledge_base=kb, status="active").version for kb in (public, private)}
    with django_capture_on_commit_callbacks(execute=True):
        response = _client(user).patch(f"/api/v1/documents/{doc.pk}/", {"knowledge_base": private.pk}, format="json")
    assert response.status_code == 200
    after = {kb.pk: IndexVersion.objects.get(knowledge_base=kb, status="active") for kb in (public, private)}
    assert all(after[pk].version > before[pk] for pk in before)
    assert after[public.pk].document_count == 1 and after[private.pk].document_count == 2
    doc.refresh_from_db()
    assert doc.status == "ready" and doc.knowledge_base_id == private.pk
    assert all(r.document_id != doc.pk for r in chunks_retrieve(user=other_user, query=QUERY, top_k=5))
    assert ("hr-private", "Salaries") in _titles(chunks_retrieve(user=user, query=QUERY, knowledge_bases=["hr-private"]))


def test_move_needs_edit_rights_on_both_bases(bases, user, other_user, make_kb):
    public, private = bases
    doc = Document.objects.get(knowledge_base=public, source_name="salaries.md")
    theirs = make_kb("theirs", owner=other_user, public=True)
    # alice edits `open` but not `theirs`; bob edits `theirs` but not `open`.
    refused = _client(user).patch(f"/api/v1/documents/{doc.pk}/", {"knowledge_base": theirs.slug}, format="json")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
    refused = _client(other_user).patch(f"/api/v1/documents/{doc.pk}/", {"knowledge_base": theirs.slug}, format="json")
    assert refused.status_code == 403
    assert Document.objects.get(pk=doc.pk).knowledge_base_id == public.pk


def test_admin_form_move_reindexes_both_and_hides_the_hit(bases, user, other_user, client,
                                                          django_capture_on_commit_callbacks):
    public, private = bases
    doc = Document.objects.get(knowledge_base=public, source_name="salaries.md")
    user.is_staff = True
    user.save()
    client.force_login(user)
    form = {"knowledge_base": str(private.pk), "title": doc.title, "source_url": "",
            "chunks-TOTAL_FORMS": "0", "chunks-INITIAL_FORMS": "0", "chunks-MIN_NUM_FORMS": "0",
            "chunks-MAX_NUM_FORMS": "0"}
    # Stale first: nothing re-indexed yet, the hit is already gone for the public reader.
    response = client.post(f"/admin/knowledge/document/{doc.pk}/change/", form)
    assert response.status_code == 302, response.content.decode()[:2000]
    assert Document.objects.get(pk=doc.pk).knowledge_base_id == private.pk
    assert all(r.document_id != doc.pk for r in chunks_retrieve(user=other_user, query=QUERY, top_k=5))
    # And the admin move queued the re-index of both bases (run here).
    before = {kb.pk: IndexVersion.objects.get(knowledge_base=kb, status="active").version for kb in (public, private)}
    form["knowledge_base"] = str(public.pk)
    with django_capture_on_commit_callbacks(execute=True):
        assert client.post(f"/admin/knowledge/document/{doc.pk}/change/", form).status_code == 302
    after = {kb.pk: IndexVersion.objects.get(knowledge_base=kb, status="active")for kb in (public, private)}
    # Both bases were brought up to date: the public one gained a version with the document back; the private
    # one's index never held it (the first move was never re-indexed), so its incremental build had nothing
    # to do and its active version now covers the current content revision as it is.
    assert after[public.pk].version > before[public.pk]
    private.refresh_from_db()
    assert after[private.pk].version == before[private.pk]
    assert IndexVersion.objects.get(pk=after[private.pk].pk).source_revision == private.content_revision
