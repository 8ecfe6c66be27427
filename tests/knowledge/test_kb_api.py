"""REST API under /api/v1/ and the source page, with the real model, files and index."""
from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile

from apps.knowledge.models import Document, KnowledgeBase
from tests.knowledge import kb_files

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("kb_env")]


@pytest.fixture
def handbook(make_kb, load_docs, user):
    kb = make_kb("handbook", owner=user)
    load_docs(kb, {"expenses.md": kb_files.MARKDOWN, "parking.html": kb_files.HTML})
    return kb


def _error(response):
    return response.json()["error"]["code"]


def client_for(user):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(user)
    return client


def test_knowledge_base_crud_and_permissions(auth_client, user, other_user, staff_user, handbook):
    listed = auth_client.get("/api/v1/knowledge-bases/").json()
    assert [kb["slug"] for kb in listed["results"]] == ["handbook"]
    assert listed["results"][0]["document_count"] == 2 and listed["results"][0]["active_version"] == 1

    payload = {"slug": "sales", "name": "Sales playbook", "is_public": True}
    response = auth_client.post("/api/v1/knowledge-bases/", payload, format="json")
    assert response.status_code == 403 and _error(response) == "permission_denied"
    user.user_permissions.add(Permission.objects.get(codename="add_knowledgebase"))
    user = type(user).objects.get(pk=user.pk)  # permissions are cached on the instance
    auth_client.force_authenticate(user)
    response = auth_client.post("/api/v1/knowledge-bases/", payload, format="json")
    assert response.status_code == 201 and response.json()["owner"] == "alice"
    duplicate = auth_client.post("/api/v1/knowledge-bases/", payload, format="json")
    assert duplicate.status_code == 400 and _error(duplicate) == "knowledge_base_exists"
    bad = auth_client.post("/api/v1/knowledge-bases/", {"slug": "x y", "name": "n"}, format="json")
    assert bad.status_code == 400 and _error(bad) == "validation_error"
    no_group = auth_client.post("/api/v1/knowledge-bases/", {"slug": "hr", "name": "HR", "allowed_group_ids": [999]},
                                format="json")
    assert no_group.status_code == 400 and _error(no_group) == "unknown_group"

    api_client = client_for(other_user)
    private_id = handbook.pk
    assert api_client.get(f"/api/v1/knowledge-bases/{private_id}/").status_code == 404
    assert _error(api_client.patch(f"/api/v1/knowledge-bases/{private_id}/", {"name": "x"}, format="json")) == \
        "knowledge_base_not_found"
    public_id = response.json()["id"]
    forbidden = api_client.patch(f"/api/v1/knowledge-bases/{public_id}/", {"name": "Mine now"}, format="json")
    assert forbidden.status_code == 403

    changed = auth_client.patch(f"/api/v1/knowledge-bases/{public_id}/", {"chunk_tokens": 64, "chunk_overlap": 80},
                                format="json")
    assert changed.status_code == 400 and _error(changed) == "validation_error"
    # is_staff alone edits nothing; the knowledge administrator permission edits every base.
    staff_edit = client_for(staff_user).patch(f"/api/v1/knowledge-bases/{public_id}/", {"name": "Staff edit"},
                                              format="json")
    assert staff_edit.status_code == 403 and _error(staff_edit) == "permission_denied"
    staff_user.user_permissions.add(Permission.objects.get(codename="change_knowledgebase"))
    staff_user = type(staff_user).objects.get(pk=staff_user.pk)
    assert client_for(staff_user).patch(f"/api/v1/knowledge-bases/{public_id}/", {"name": "Staff edit"},
                                        format="json").json()["name"] == "Staff edit"
    assert auth_client.delete(f"/api/v1/knowledge-bases/{public_id}/").status_code == 204
    # Hidden at once (its slug freed for a new base), removed by the background purge.
    assert auth_client.get(f"/api/v1/knowledge-bases/{public_id}/").status_code == 404
    assert KnowledgeBase.objects.get(pk=public_id).deleted_at is not None
    assert auth_client.post("/api/v1/knowledge-bases/", {"slug": "sales", "name": "Again"},
                            format="json").status_code == 201
    from apps.knowledge.services import knowledge_base_purge

    assert knowledge_base_purge(knowledge_base_id=public_id) is True
    assert not KnowledgeBase.objects.filter(pk=public_id).exists()


def test_upload_many_files_each_judged_on_its_own(auth_client, handbook, settings, django_capture_on_commit_callbacks):
    settings.KNOWLEDGE_MAX_UPLOAD_BYTES = 2000
    files = [SimpleUploadedFile("fire.txt", kb_files.TEXT), SimpleUploadedFile("offices.csv", kb_files.CSV),
             SimpleUploadedFile("huge.txt", b"word " * 1000), SimpleUploadedFile("copy.md", kb_files.MARKDOWN),
             SimpleUploadedFile("image.png", kb_files.PNG)]
    with django_capture_on_commit_callbacks(execute=True):
        response = auth_client.post(f"/api/v1/knowledge-bases/{handbook.pk}/documents/", {"files": files},
                                    format="multipart")
    assert response.status_code == 201, response.json()
    results = {r["name"]: r for r in response.json()["results"]}
    assert {name: r["status"] for name, r in results.items()} == {
        "fire.txt": "created", "offices.csv": "created", "huge.txt": "rejected", "copy.md": "duplicate",
        "image.png": "created"}
    assert results["huge.txt"]["error"]["code"] == "too_large"

    listed = auth_client.get(f"/api/v1/knowledge-bases/{handbook.pk}/documents/").json()["results"]
    by_name = {d["source_name"]: d for d in listed}
    assert by_name["fire.txt"]["status"] == "ready" and by_name["fire.txt"]["chunk_count"] >= 1
    assert by_name["image.png"]["status"] == "failed"
    assert by_name["image.png"]["error"]["code"] == "unsupported_type"
    failed = auth_client.get(f"/api/v1/knowledge-bases/{handbook.pk}/documents/?status=failed").json()["results"]
    assert [d["source_name"] for d in failed] == ["image.png"]
    bad_filter = auth_client.get(f"/api/v1/knowledge-bases/{handbook.pk}/documents/?status=done")
    assert bad_filter.status_code == 400 and _error(bad_filter) == "invalid_status"

    everything_too_big = auth_client.post(f"/api/v1/knowledge-bases/{handbook.pk}/documents/",
                                          {"files": [SimpleUploadedFile("big.txt", b"x" * 5000)]}, format="multipart")
    assert everything_too_big.status_code == 413 and _error(everything_too_big) == "too_large"
    empty = auth_client.post(f"/api/v1/knowledge-bases/{handbook.pk}/documents/", {}, format="multipart")
    assert empty.status_code == 400 and _error(empty) == "no_files"


def test_document_detail_delete_and_other_users_ids(auth_client, other_user, handbook,
                                                    django_capture_on_commit_callbacks):
    document = Document.objects.get(source_name="expenses.md")
    detail = auth_client.get(f"/api/v1/documents/{document.pk}/").json()
    assert detail["status"] == "ready" and detail["detected_type"] == "markdown"
    assert [c["position"] for c in detail["chunks"]] == list(range(len(detail["chunks"])))
    assert any(c["heading_path"] == ["Expense Policy", "Hotels"] for c in detail["chunks"])

    api_client = client_for(other_user)
    for method, url in [("get", f"/api/v1/documents/{document.pk}/"), ("delete", f"/api/v1/documents/{document.pk}/"),
                        ("post", f"/api/v1/documents/{document.pk}/reindex/"),
                        ("get", f"/api/v1/knowledge-bases/{handbook.pk}/documents/")]:
        response = getattr(api_client, method)(url)
        assert response.status_code == 404, (method, url)
        assert _error(response) in ("document_not_found", "knowledge_base_not_found")

    with django_capture_on_commit_callbacks(execute=True):
        assert auth_client.delete(f"/api/v1/documents/{document.pk}/").status_code == 202
    assert auth_client.get(f"/api/v1/documents/{document.pk}/").status_code == 404
    assert not Document.objects.filter(pk=document.pk).exists()


def test_search_endpoint_validates_every_parameter(auth_client, other_user, handbook):
    response = auth_client.get("/api/v1/search/", {"q": "hotel per night", "kb": "handbook", "top_k": 2})
    assert response.status_code == 200
    body = response.json()
    assert body["mode"] == "hybrid" and len(body["results"]) == 2
    top = body["results"][0]
    assert "150 EUR" in top["text"] and top["heading_path"] == ["Expense Policy", "Hotels"]
    assert set(top["scores"]) == {"dense", "bm25", "fused"} and top["url"].startswith("/sources/")
    for field in ("chunk_id", "document_id", "document_title", "knowledge_base_slug", "char_start", "char_end",
                  "page", "index_version", "score"):
        assert field in top

    cases = [({"q": ""}, 400, "invalid_query"), ({"q": "x", "mode": "magic"}, 400, "invalid_mode"),
             ({"q": "x", "top_k": "ten"}, 400, "invalid_top_k"), ({"q": "x", "top_k": "0"}, 400, "invalid_top_k"),
             ({"q": "x", "top_k": "101"}, 400, "invalid_top_k"), ({"q": "x", "kb": "nope"}, 404,
                                                                    "knowledge_base_not_found")]
    for params, status, code in cases:
        response = auth_client.get("/api/v1/search/", params)
        assert (response.status_code, _error(response)) == (status, code), params
    api_client = client_for(other_user)
    leaked = api_client.get("/api/v1/search/", {"q": "hotel", "kb": str(handbook.pk)})
    assert leaked.status_code == 404 and _error(leaked) == "knowledge_base_not_found"
    assert api_client.get("/api/v1/search/", {"q": "hotel"}).json()["results"] == []
    assert _error(type(api_client)().get("/api/v1/search/", {"q": "hotel"})) == "not_authenticated"


def test_openapi_schema_lists_the_knowledge_endpoints(auth_client):
    schema = auth_client.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    for path in ["/api/v1/knowledge-bases/", "/api/v1/knowledge-bases/{kb_id}/",
                 "/api/v1/knowledge-bases/{kb_id}/documents/", "/api/v1/documents/{document_id}/",
                 "/api/v1/documents/{document_id}/reindex/", "/api/v1/search/"]:
        assert path in schema["paths"], path
    upload = schema["paths"]["/api/v1/knowledge-bases/{kb_id}/documents/"]["post"]
    assert "multipart/form-data" in upload["requestBody"]["content"]
    assert {p["name"] for p in schema["paths"]["/api/v1/search/"]["get"]["parameters"]} >= {"q", "kb", "top_k", "mode"}


def test_source_page_highlights_the_cited_chunk(client, user, other_user, handbook):
    chunk = Document.objects.get(source_name="expenses.md").chunks.get(text__contains="150 EUR")
    url = f"/sources/{chunk.document_id}/?chunk={chunk.pk}"
    assert client.get(url).status_code == 302  # sign in first
    client.force_login(user)
    page = client.get(url).content.decode()
    assert '<mark id="cited">' in page and "Expense Policy" in page and "Hotels" in page
    cited = page.split('<mark id="cited">', 1)[1].split("</mark>", 1)[0]
    assert "150 EUR" in cited and "Meals" not in cited
    client.force_login(other_user)
    assert client.get(url).status_code == 404
