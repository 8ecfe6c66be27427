"""Editor console pages, as a staff user with the Django test client."""
from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from apps.knowledge.models import Document, IndexVersion
from tests.knowledge import kb_files

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("kb_env")]


@pytest.fixture
def editor(client, django_user_model):
    admin = django_user_model.objects.create_superuser(username="boss", password="pw-boss-123")
    client.force_login(admin)
    return admin


@pytest.fixture
def kb(make_kb, load_docs, editor):
    kb = make_kb("handbook", owner=editor, public=True)
    load_docs(kb, {"expenses.md": kb_files.MARKDOWN, "image.png": kb_files.PNG})
    return kb


def test_changelists_show_counts_versions_and_status_badges(client, kb):
    page = client.get("/admin/knowledge/knowledgebase/").content.decode()
    assert "handbook" in page and "v1 · " in page and "public" in page
    documents = client.get("/admin/knowledge/document/").content.decode()
    assert "Ready" in documents and "Failed" in documents and "unsupported_type" in documents
    assert "Upload files" in documents
    versions = client.get("/admin/knowledge/indexversion/").content.decode()
    assert "active" in versions


def test_change_pages_show_chunk_preview_and_tools(client, kb):
    document = Document.objects.get(source_name="expenses.md")
    page = client.get(f"/admin/knowledge/document/{document.pk}/change/").content.decode()
    assert "Chunks (read-only preview)" in page and "150 EUR" in page and "Expense Policy › Hotels" in page
    kb_page = client.get(f"/admin/knowledge/knowledgebase/{kb.pk}/change/").content.decode()
    assert "Test retrieval" in kb_page and "Rebuild index" in kb_page and "Index versions" in kb_page


def test_upload_many_files_at_once(client, kb, settings, django_capture_on_commit_callbacks):
    settings.KNOWLEDGE_MAX_UPLOAD_BYTES = 1500
    form = client.get(f"/admin/knowledge/document/upload/?knowledge_base={kb.pk}")
    assert form.status_code == 200 and "multiple" in form.content.decode()
    files = [SimpleUploadedFile("fire.txt", kb_files.TEXT), SimpleUploadedFile("parking.html", kb_files.HTML),
             SimpleUploadedFile("big.txt", b"words " * 400)]
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/admin/knowledge/document/upload/", {"knowledge_base": kb.pk, "files": files},
                               follow=True)
    page = response.content.decode()
    assert "2 file(s) uploaded" in page and "ig.txt: too_large: 2400 bytes" in page
    ready = set(Document.objects.filter(status="ready").values_list("source_name", flat=True))
    assert ready == {"expenses.md", "fire.txt", "parking.html"}
    assert IndexVersion.objects.get(status="active").document_count == 3


def test_actions_enqueue_reindex_and_rebuild(client, kb, encode_counter, django_capture_on_commit_callbacks):
    documents = list(Document.objects.values_list("pk", flat=True))
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/admin/knowledge/document/", {"action": "reindex", "_selected_action": documents},
                               follow=True)
    assert "queued for re-ingestion" in response.content.decode()
    assert encode_counter["texts"] == 0  # re-ingested, but every vector was reused
    assert IndexVersion.objects.get(status="active").version == 2

    with django_capture_on_commit_callbacks(execute=True):
        client.post("/admin/knowledge/knowledgebase/", {"action": "rebuild_indexes", "_selected_action": [kb.pk]})
    assert IndexVersion.objects.get(status="active").version == 3
    with django_capture_on_commit_callbacks(execute=True):
        client.post(f"/admin/knowledge/knowledgebase/{kb.pk}/rebuild/")
    assert IndexVersion.objects.get(status="active").version == 4


def test_delete_from_admin_goes_through_the_service(client, kb, django_capture_on_commit_callbacks):
    document = Document.objects.get(source_name="expenses.md")
    with django_capture_on_commit_callbacks(execute=True):
        client.post("/admin/knowledge/document/", {"action": "delete_documents", "_selected_action": [document.pk]})
    assert not Document.objects.filter(pk=document.pk).exists()
    assert IndexVersion.objects.get(status="active").document_count == 0


def test_test_retrieval_page_shows_stage_scores(client, kb):
    url = f"/admin/knowledge/knowledgebase/{kb.pk}/test-retrieval/"
    assert client.get(url).status_code == 200
    page = client.get(url, {"q": "hotel costs per night", "mode": "hybrid", "top_k": 3}).content.decode()
    assert "150 EUR" in page and "dense" in page and "BM25" in page and "fused" in page
    assert "Searching index <strong>v1</strong>" in page
    bm25_only = client.get(url, {"q": "zzzz-unknown-term", "mode": "bm25", "top_k": 3}).content.decode()
    assert "No chunk matched." in bm25_only


def test_admin_edit_with_new_file_makes_a_new_version(client, kb, django_capture_on_commit_callbacks):
    document = Document.objects.get(source_name="expenses.md")
    edited = kb_files.MARKDOWN.replace(b"150 EUR", b"170 EUR")
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/admin/knowledge/document/{document.pk}/change/", {
            "knowledge_base": kb.pk, "title": "Expenses", "source_url": "",
            "file": SimpleUploadedFile("expenses.md", edited), "chunks-TOTAL_FORMS": "0",
            "chunks-INITIAL_FORMS": "0", "chunks-MIN_NUM_FORMS": "0", "chunks-MAX_NUM_FORMS": "0",
        })
    assert response.status_code == 302, response.content.decode()[:2000]
    document.refresh_from_db()
    assert document.version == 2 and document.status == "ready" and "170 EUR" in document.text
    assert IndexVersion.objects.get(status="active").version == 2
