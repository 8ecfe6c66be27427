"""Ingestion through the services with real files, the real model and real index writes."""
from __future__ import annotations

import pytest

from apps.knowledge import services
from apps.knowledge.models import Chunk, Document, IndexVersion
from tests.knowledge import kb_files

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("kb_env")]


def _import(kb, name, data):
    return services.document_import(knowledge_base=kb, user=kb.owner, name=name, data=data).document


def test_every_supported_type_is_parsed_chunked_and_embedded(make_kb, load_docs):
    kb = make_kb()
    files = {
        "report.pdf": kb_files.pdf([["Quarterly report.", "Revenue grew by twelve percent."],
                                    ["Page two discusses the warehouse expansion in Lisbon."]]),
        "travel.docx": kb_files.docx([("Flights", ["Economy class for flights under six hours."]),
                                      ("Trains", ["First class train tickets are allowed."])]),
        "expenses.md": kb_files.MARKDOWN,
        "parking.html": kb_files.HTML,
        "offices.csv": kb_files.CSV,
        "fire.txt": kb_files.TEXT,
    }
    results, build = load_docs(kb, files)
    assert {name: r.status for name, r in results.items()} == dict.fromkeys(files, "ready")
    types = dict(Document.objects.values_list("source_name", "detected_type"))
    assert types == {"report.pdf": "pdf", "travel.docx": "docx", "expenses.md": "markdown",
                     "parking.html": "html", "offices.csv": "csv", "fire.txt": "text"}
    assert build.status == "built" and build.document_count == 6

    for chunk in Chunk.objects.select_related("document"):
        # A citation can point at the exact place: the span indexes the stored document text.
        assert chunk.document.text[chunk.char_start:chunk.char_end] == chunk.text
        assert len(chunk.embedding) == 384 * 4 and chunk.token_count > 0
    pdf_pages = set(Chunk.objects.filter(document__source_name="report.pdf").values_list("page", flat=True))
    assert pdf_pages == {1, 2}
    trains = Chunk.objects.get(document__source_name="travel.docx", text__contains="First class")
    assert trains.heading_path[-1] == "Trains"
    hotels = Chunk.objects.get(document__source_name="expenses.md", text__contains="150 EUR")
    assert hotels.heading_path == ["Expense Policy", "Hotels"]
    html_text = Document.objects.get(source_name="parking.html").text
    assert "Charging stations" in html_text and "do not index" not in html_text and "Navigation menu" not in html_text


@pytest.mark.parametrize("name,data,code", [
    ("image.png", kb_files.PNG, "unsupported_type"),
    ("broken.pdf", kb_files.pdf([["Some text on a page."]])[:300], "corrupt_file"),
    ("locked.pdf", kb_files.encrypted_pdf(kb_files.pdf([["Salaries."]])), "encrypted_file"),
    ("empty.txt", b"   \n\n  ", "empty_document"),
    ("bomb.docx", kb_files.zip_bomb_docx(), "decompression_bomb"),
])
def test_bad_files_fail_with_a_stable_code_and_never_raise(make_kb, name, data, code):
    kb = make_kb()
    good = _import(kb, "fire.txt", kb_files.TEXT)
    bad = _import(kb, name, data)
    outcomes = services.documents_ingest(document_ids=[bad.pk, good.pk], rebuild=False)
    assert [(o.status, o.error_code) for o in outcomes] == [("failed", code), ("ready", "")]
    bad.refresh_from_db()
    assert bad.status == Document.Status.FAILED and bad.error_code == code and bad.error_message
    assert not bad.chunks.exists()


def test_too_large_by_bytes_and_by_pages_is_configurable(make_kb, settings):
    kb = make_kb()
    big = _import(kb, "many-pages.pdf", kb_files.pdf([[f"Page {n} text."] for n in range(1, 6)]))
    settings.KNOWLEDGE_MAX_PAGES = 3
    assert services.documents_ingest(document_ids=[big.pk], rebuild=False)[0].error_code == "too_large"
    settings.KNOWLEDGE_MAX_PAGES = 100
    settings.KNOWLEDGE_MAX_UPLOAD_BYTES = 100
    assert services.documents_ingest(document_ids=[big.pk], rebuild=False)[0].error_code == "too_large"
    settings.KNOWLEDGE_MAX_UPLOAD_BYTES = 10_000_000
    assert services.documents_ingest(document_ids=[big.pk], rebuild=False)[0].status == "ready"


def test_type_is_detected_from_content_not_the_name(make_kb):
    kb = make_kb()
    renamed = _import(kb, "notes.txt", kb_files.pdf([["A PDF pretending to be text."]]))
    services.documents_ingest(document_ids=[renamed.pk], rebuild=False)
    renamed.refresh_from_db()
    assert renamed.status == "ready" and renamed.detected_type == "pdf"


def test_reingesting_unchanged_documents_encodes_nothing(make_kb, load_docs, encode_counter):
    kb = make_kb()
    results, _ = load_docs(kb, {"expenses.md": kb_files.MARKDOWN, "fire.txt": kb_files.TEXT})
    first = encode_counter["texts"]
    assert first == sum(r.chunks for r in results.values()) > 0

    again = services.documents_ingest(document_ids=list(Document.objects.values_list("pk", flat=True)))
    assert [o.status for o in again] == ["unchanged", "unchanged"]
    forced = services.documents_ingest(document_ids=list(Document.objects.values_list("pk", flat=True)), force=True,
                                       rebuild=False)
    assert [o.status for o in forced] == ["ready", "ready"] and sum(o.encoded for o in forced) == 0
    rebuilt = services.index_rebuild(knowledge_base_id=kb.pk, force=True)
    assert rebuilt.status == "built" and rebuilt.encoded == 0
    assert encode_counter["texts"] == first


def test_changing_one_document_reembeds_only_its_new_text(make_kb, load_docs, encode_counter):
    kb = make_kb()
    load_docs(kb, {"expenses.md": kb_files.MARKDOWN, "fire.txt": kb_files.TEXT})
    before = encode_counter["texts"]
    fire_chunks = set(Chunk.objects.filter(document__source_name="fire.txt").values_list("pk", flat=True))
    edited = kb_files.MARKDOWN + b"\n## Taxis\n\nTaxis are reimbursed after 22:00 only.\n"
    document = _import(kb, "expenses.md", edited)
    assert document.version == 2
    [outcome] = services.documents_ingest(document_ids=[document.pk], rebuild=False)
    assert outcome.status == "ready" and outcome.encoded == 1 and outcome.reused == outcome.chunks - 1
    assert encode_counter["texts"] == before + 1
    # The other document's chunks are untouched rows with their stored vectors.
    assert set(Chunk.objects.filter(document__source_name="fire.txt", superseded_at__isnull=True)
               .values_list("pk", flat=True)) == fire_chunks


def test_ingest_task_is_idempotent_and_enqueued_after_commit(make_kb, user, django_capture_on_commit_callbacks):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from apps.knowledge import tasks

    kb = make_kb()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        [outcome] = services.documents_upload(knowledge_base=kb, user=user,
                                              files=[SimpleUploadedFile("fire.txt", kb_files.TEXT)])
    document = outcome.document
    assert Document.objects.get(pk=document.pk).status == "pending"  # nothing ran before the commit
    with django_capture_on_commit_callbacks(execute=True):
        for callback in callbacks:
            callback()
    document.refresh_from_db()
    assert document.status == "ready"
    chunks = list(Chunk.objects.values_list("pk", "content_hash"))
    version = IndexVersion.objects.get(status="active").version

    assert tasks.ingest_document.apply(args=[document.pk]).get()["status"] == "unchanged"
    assert tasks.rebuild_index.apply(args=[kb.pk]).get() == {"status": "unchanged", "version": version,
                                                             "chunks": len(chunks)}
    assert list(Chunk.objects.values_list("pk", "content_hash")) == chunks
    assert IndexVersion.objects.count() == 1


def test_delete_task_is_idempotent_and_removes_the_document_from_the_index(make_kb, load_docs, user,
                                                                           django_capture_on_commit_callbacks):
    from apps.knowledge import tasks

    kb = make_kb()
    load_docs(kb, {"expenses.md": kb_files.MARKDOWN, "fire.txt": kb_files.TEXT})
    document = Document.objects.get(source_name="fire.txt")
    with django_capture_on_commit_callbacks(execute=True):
        services.document_delete(document=document, user=user)
    assert not Document.objects.filter(pk=document.pk).exists()
    active = IndexVersion.objects.get(status="active")
    assert active.version == 2 and active.document_count == 1
    assert tasks.delete_document.apply(args=[document.pk]).get() is False
    assert IndexVersion.objects.get(status="active").version == 2
    live = Document.objects.get(source_name="expenses.md")
    assert tasks.delete_document.apply(args=[live.pk]).get() is False  # never purges a live document
    assert Document.objects.filter(pk=live.pk).exists()


def test_missing_file_and_unreachable_url_are_reported(make_kb, settings, tmp_path):
    import os

    kb = make_kb()
    gone = _import(kb, "fire.txt", kb_files.TEXT)
    os.remove(gone.file.path)
    [outcome] = services.documents_ingest(document_ids=[gone.pk], rebuild=False)
    assert (outcome.status, outcome.error_code) == ("failed", "file_missing")


def test_source_url_is_fetched_from_a_real_server(make_kb, user, settings):
    import http.server
    import threading

    body = kb_files.MARKDOWN

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/policy.md":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings.OUTBOUND_ALLOWED_HOSTS = ["127.0.0.1"]  # the test server is "on premise"
    try:
        kb = make_kb()
        base = f"http://127.0.0.1:{server.server_port}"
        ok = services.document_save(document=Document(knowledge_base=kb, source_url=f"{base}/policy.md"),
                                    user=user, content_changed=True)
        missing = services.document_save(document=Document(knowledge_base=kb, source_url=f"{base}/nope.md"),
                                         user=user, content_changed=True)
        outcomes = services.documents_ingest(document_ids=[ok.pk, missing.pk], rebuild=False)
    finally:
        server.shutdown()
    assert [(o.status, o.error_code) for o in outcomes] == [("ready", ""), ("failed", "fetch_failed")]
    ok.refresh_from_db()
    assert ok.detected_type == "markdown" and "150 EUR" in ok.text


def test_source_url_to_internal_addresses_is_refused_redirects_included(make_kb, user, settings):
    """SSRF: a source URL (or a redirect from an allowed one) must not read the platform's own network."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/iam/security-credentials/")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        kb = make_kb()
        port = server.server_port
        direct = services.document_save(document=Document(knowledge_base=kb, source_url=f"http://127.0.0.1:{port}/x"),
                                        user=user, content_changed=True)
        redis = services.document_save(document=Document(knowledge_base=kb, source_url="http://localhost:6379/"),
                                       user=user, content_changed=True)
        outcomes = services.documents_ingest(document_ids=[direct.pk, redis.pk], rebuild=False)
        assert [(o.status, o.error_code) for o in outcomes] == [("failed", "address_not_allowed")] * 2
        settings.OUTBOUND_ALLOWED_HOSTS = [f"127.0.0.1:{port}"]
        [outcome] = services.documents_ingest(document_ids=[direct.pk], rebuild=False)
        assert (outcome.status, outcome.error_code) == ("failed", "address_not_allowed")  # the redirect hop
    finally:
        server.shutdown()
    direct.refresh_from_db()
    assert "169.254.169.254" in direct.error_message and direct.text == ""
