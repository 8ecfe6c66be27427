"""Index maintenance (issue 13): incremental versions, coalesced bulk builds, double buffering, per-base
degradation, the sweeper, lean retrieval reads and background knowledge-base deletion."""
from __future__ import annotations

import json
import re
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.core.errors import ApplicationError
from apps.knowledge import services
from apps.knowledge.index_registry import registry
from apps.knowledge.models import Chunk, Document, IndexVersion, KnowledgeBase
from apps.knowledge.selectors import chunks_retrieve

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("kb_env")]


def note(i: int) -> bytes:
    return f"# Note {i}\n\nCODE{i:03d} is the code word of note number {i}.\n".encode()


def test_a_60_file_upload_in_one_request_builds_at_most_3_versions(client, user, make_kb,
                                                                  django_capture_on_commit_callbacks):
    kb = make_kb(public=True)
    user.is_staff = True
    user.save()
    client.force_login(user)
    files = [SimpleUploadedFile(f"note-{i:02d}.md", note(i)) for i in range(60)]
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/api/v1/knowledge-bases/{kb.pk}/documents/", {"files": files})
    assert response.status_code == 201, response.content[:500]
    versions = list(IndexVersion.objects.filter(knowledge_base=kb).values_list("version", "document_count"))
    assert 1 <= len(versions) <= 3, versions
    active = IndexVersion.objects.get(knowledge_base=kb, status="active")
    assert active.document_count == 60 and Document.objects.filter(knowledge_base=kb, status="ready").count() == 60
    hit = chunks_retrieve(user=user, query="CODE042", knowledge_bases=[kb.pk], mode="bm25")[0]
    assert "CODE042" in hit.text


@pytest.mark.django_db(transaction=True)  # commits for real: each ingest asks for its build as it finishes
def test_a_bulk_upload_builds_a_bounded_number_of_versions_however_slow_the_ingest(user, make_kb, settings):
    """The bound is a count, not a time window: with a wait far shorter than the upload takes (as on a slow
    machine, or for a very large upload) the base still gets KNOWLEDGE_BULK_MAX_VERSIONS versions, the early
    ones serving the documents ingested so far, the last one all of them."""
    # A wait far below what ingesting one file takes, so that the upload lasts many waits however fast
    # this machine is (0.25 s was longer than a whole 60-file upload on a quiet CI box).
    settings.KNOWLEDGE_REBUILD_MAX_WAIT_SECONDS = 0.002
    settings.KNOWLEDGE_BULK_MAX_VERSIONS = 3
    settings.KNOWLEDGE_REBUILD_STALL_SECONDS = 60  # a loaded machine pausing the test is not a stuck document
    kb = make_kb()
    files = [SimpleUploadedFile(f"note-{i:02d}.md", note(i)) for i in range(60)]
    started = time.monotonic()
    services.documents_upload(knowledge_base=kb, user=user, files=files)
    # The upload lasted several waits: a build per wait would have made more than 3 versions.
    assert time.monotonic() - started > 4 * settings.KNOWLEDGE_REBUILD_MAX_WAIT_SECONDS
    versions = list(IndexVersion.objects.filter(knowledge_base=kb).order_by("version")
                    .values_list("status", "document_count"))
    assert len(versions) == 3, versions
    assert versions[0][1] < versions[1][1] < 60 and versions[-1] == ("active", 60)
    assert "CODE059" in chunks_retrieve(user=user, query="CODE059", knowledge_bases=[kb.pk], mode="bm25")[0].text


def _shift_back(kb, seconds: float) -> None:
    """Moves the base's clock marks into the past: as if `seconds` had gone by without anything happening."""
    from django.db.models import F

    delta = timedelta(seconds=seconds)
    Document.objects.filter(knowledge_base=kb).update(updated_at=F("updated_at") - delta)
    Document.objects.filter(knowledge_base=kb, ingested_at__isnull=False).update(ingested_at=F("ingested_at") - delta)
    IndexVersion.objects.filter(knowledge_base=kb).update(created_at=F("created_at") - delta)


def test_a_stuck_document_delays_the_others_only_until_ingestion_stalls(make_kb, load_docs, user, settings):
    settings.KNOWLEDGE_REBUILD_MAX_WAIT_SECONDS = 30
    settings.KNOWLEDGE_REBUILD_STALL_SECONDS = 30
    kb = make_kb()
    load_docs(kb, {"n0.md": note(0)})
    # A document that never finishes (its task was lost), and one uploaded after it that did.
    services.document_import(knowledge_base=kb, user=user, name="stuck.md", data=note(9))
    _shift_back(kb, 5)
    fresh = services.document_import(knowledge_base=kb, user=user, name="n1.md", data=note(1)).document
    services.documents_ingest(document_ids=[fresh.pk], rebuild=False)
    assert services.index_rebuild(knowledge_base_id=kb.pk).status == "deferred"  # the burst is still going
    _shift_back(kb, 31)  # no document of the base finished for longer than the wait: stalled
    assert services.index_rebuild(knowledge_base_id=kb.pk).status == "built"
    assert chunks_retrieve(user=user, query="CODE001", knowledge_bases=[kb.pk], mode="bm25")
    assert Document.objects.get(knowledge_base=kb, source_name="stuck.md").status == "pending"


def test_a_build_in_flight_or_a_spent_budget_defers_the_next_one_until_the_burst_ends(make_kb, user, settings):
    settings.KNOWLEDGE_REBUILD_MAX_WAIT_SECONDS = 30
    settings.KNOWLEDGE_BULK_MAX_VERSIONS = 2  # one version during the burst, one at its end
    settings.KNOWLEDGE_REBUILD_STALL_SECONDS = 7200
    kb = make_kb()
    docs = [services.document_import(knowledge_base=kb, user=user, name=f"n{i}.md", data=note(i)).document
            for i in range(4)]

    def ingest(i: int) -> None:
        services.documents_ingest(document_ids=[docs[i].pk], rebuild=False)

    ingest(0)
    assert services.index_rebuild(knowledge_base_id=kb.pk).status == "deferred"  # the burst is younger than the wait
    _shift_back(kb, 31)
    ingest(1)
    in_flight = IndexVersion.objects.create(knowledge_base=kb, version=99, status=IndexVersion.Status.BUILDING)
    IndexVersion.objects.filter(pk=in_flight.pk).update(created_at=timezone.now() - timedelta(seconds=40))
    assert services.index_rebuild(knowledge_base_id=kb.pk).status == "deferred"  # a build is in flight
    in_flight.delete()
    first = services.index_rebuild(knowledge_base_id=kb.pk)
    assert first.status == "built" and first.document_count == 2  # due: what is ready so far
    _shift_back(kb, 3600)
    ingest(2)
    assert services.index_rebuild(knowledge_base_id=kb.pk).status == "deferred"  # long due, but the budget is spent
    ingest(3)
    last = services.index_rebuild(knowledge_base_id=kb.pk)  # the burst is over: the final build
    assert last.status == "built" and last.document_count == 4
    assert IndexVersion.objects.filter(knowledge_base=kb).count() == 2


def test_adding_changing_and_deleting_documents_writes_only_their_chunks(make_kb, load_docs, user):
    kb = make_kb()
    _, first = load_docs(kb, {f"n{i}.md": note(i) for i in range(5)})
    assert first.kind == "full" and first.written == 5
    _, added = load_docs(kb, {"n5.md": note(5)})
    assert (added.kind, added.written, added.tombstoned) == ("incremental", 1, 0)
    _, changed = load_docs(kb, {"n2.md": b"# Note 2\n\nNow CODE902 replaces the old code word.\n"})
    assert (changed.kind, changed.written, changed.tombstoned) == ("incremental", 1, 1)
    assert [r.text for r in chunks_retrieve(user=user, query="CODE002", knowledge_bases=[kb.pk], mode="bm25")] == []
    assert "CODE902" in chunks_retrieve(user=user, query="CODE902", knowledge_bases=[kb.pk], mode="bm25")[0].text

    doc = Document.objects.get(knowledge_base=kb, source_name="n3.md")
    services.document_delete(document=doc, user=user)
    services.document_purge(document_id=doc.pk)
    deleted = services.index_rebuild(knowledge_base_id=kb.pk)
    # Nothing new to write; the four one-chunk segments of the edits reached the merge factor meanwhile.
    assert deleted.tombstoned == 1 and (deleted.kind, deleted.written) in {("incremental", 0), ("merge", 3)}
    active = IndexVersion.objects.get(knowledge_base=kb, status="active")
    assert active.chunk_count == 5 and active.document_count == 5
    assert not chunks_retrieve(user=user, query="CODE003", knowledge_bases=[kb.pk], mode="bm25")
    assert services.index_rebuild(knowledge_base_id=kb.pk).status == "unchanged"


def test_small_segments_are_merged_and_a_forced_rebuild_writes_everything(make_kb, load_docs, user):
    kb = make_kb()
    load_docs(kb, {"n0.md": note(0)})
    kinds = []
    for i in range(1, 5):
        kinds.append(load_docs(kb, {f"n{i}.md": note(i)})[1].kind)
    active = IndexVersion.objects.get(knowledge_base=kb, status="active")
    assert "merge" in kinds and active.segment_count < 5 and active.chunk_count == 5
    found = chunks_retrieve(user=user, query="code word", knowledge_bases=[kb.pk], top_k=10, mode="bm25")
    assert {re.search(r"CODE\d+", r.text).group() for r in found} == {f"CODE{i:03d}" for i in range(5)}
    full = services.index_rebuild(knowledge_base_id=kb.pk, force=True)
    assert full.kind == "full" and full.written == 5
    assert IndexVersion.objects.get(knowledge_base=kb, status="active").segment_count == 1


def test_a_search_never_waits_for_a_newer_version_to_load(make_kb, load_docs, user, settings):
    settings.KNOWLEDGE_SWAP_WAIT_SECONDS = 0
    kb = make_kb()
    load_docs(kb, {"n0.md": note(0)})
    old = registry.bundle(kb.pk)
    load_docs(kb, {"n1.md": note(1)})  # v2 active: the next search starts its load and is served by v1
    first = registry.bundle(kb.pk)
    # ...unless the knowledge_updated event (sent on commit) already loaded v2 in the background.
    assert first is old or first.version == 2
    deadline = time.monotonic() + 20
    while registry.bundle(kb.pk).version != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    new = registry.bundle(kb.pk)
    assert new.version == 2 and new.parts[0].segment is old.parts[0].segment  # the unchanged segment is shared


def _break_segment(version: IndexVersion) -> None:
    manifest = json.loads((Path(version.artifact_path) / "manifest.json").read_text())
    newest = manifest["segments"][-1]["name"]
    (Path(version.artifact_path).parent / "segments" / newest / "dense.faiss").write_bytes(b"not an index")


def test_a_bad_artifact_degrades_only_its_own_base(make_kb, load_docs, user, settings):
    from apps.monitoring.checks import check_indexes  # noqa: F401  (readiness has no per-base check)

    good, bad = make_kb("good"), make_kb("bad")
    load_docs(good, {"g.md": note(1)})
    load_docs(bad, {"b.md": note(2)})
    held = registry.bundle(bad.pk)
    load_docs(bad, {"b2.md": note(3)})
    _break_segment(IndexVersion.objects.get(knowledge_base=bad, status="active"))
    # A process that holds the previous version keeps serving it.
    assert chunks_retrieve(user=user, query="CODE002", knowledge_bases=[bad.pk], mode="bm25")
    assert registry.bundle(bad.pk) is held and registry.status(bad.pk)["state"] == "degraded"
    # A process that holds nothing answers index_unavailable for that base only.
    registry.clear()
    with pytest.raises(ApplicationError) as info:
        chunks_retrieve(user=user, query="CODE003", knowledge_bases=[bad.pk], mode="bm25")
    assert info.value.code == "index_unavailable" and info.value.status_code == 503
    assert registry.status(bad.pk)["state"] == "unavailable"
    assert chunks_retrieve(user=user, query="CODE001", knowledge_bases=[good.pk], mode="bm25")
    everything = chunks_retrieve(user=user, query="code word", top_k=5, mode="bm25")  # all bases: bad left out
    assert everything and {r.knowledge_base_id for r in everything} == {good.pk}
    assert registry.warm_up() == [f"{bad.pk}:v{IndexVersion.objects.get(knowledge_base=bad, status='active').version}"]
    from apps.knowledge.metrics import indexes_degraded

    assert indexes_degraded._value.get() == 1


def test_the_sweeper_requeues_stuck_documents_parks_repeat_offenders_and_rebuilds_bases_behind(
        make_kb, load_docs, user, settings, django_capture_on_commit_callbacks):
    kb = make_kb()
    load_docs(kb, {"n0.md": note(0)})
    lost = services.document_import(knowledge_base=kb, user=user, name="lost.md", data=note(7)).document
    old = timezone.now() - timedelta(seconds=settings.KNOWLEDGE_INGEST_STUCK_SECONDS + 5)
    Document.objects.filter(pk=lost.pk).update(updated_at=old)  # as if its enqueue was lost long ago
    with django_capture_on_commit_callbacks(execute=True):
        report = services.knowledge_sweep()
    assert report.requeued == [lost.pk]
    lost.refresh_from_db()
    assert lost.status == "ready" and lost.ingest_attempts == 0
    assert IndexVersion.objects.get(knowledge_base=kb, status="active").document_count == 2

    crashing = services.document_import(knowledge_base=kb, user=user, name="crash.md", data=note(8)).document
    Document.objects.filter(pk=crashing.pk).update(status="processing", updated_at=old,
                                                  ingest_attempts=settings.KNOWLEDGE_INGEST_MAX_ATTEMPTS)
    report = services.knowledge_sweep()
    crashing.refresh_from_db()
    assert report.parked == [crashing.pk] and crashing.status == "failed" and crashing.error_code == "ingest_stuck"

    KnowledgeBase.objects.filter(pk=kb.pk).update(content_revision=999)  # a build was lost
    with django_capture_on_commit_callbacks(execute=True):
        assert kb.pk in services.knowledge_sweep().rebuilds
    assert IndexVersion.objects.get(knowledge_base=kb, status="active").source_revision == 999


def test_retrieval_reads_no_document_text_and_no_embeddings(make_kb, load_docs, user):
    kb = make_kb()
    load_docs(kb, {"n0.md": note(0), "n1.md": note(1)})
    chunks_retrieve(user=user, query="warm up", knowledge_bases=[kb.pk])
    with CaptureQueriesContext(connection) as queries:
        results = chunks_retrieve(user=user, query="code word number", knowledge_bases=[kb.pk], top_k=2)
    assert results and results[0].document_title
    selects = " ".join(q["sql"] for q in queries.captured_queries if "knowledge_chunk" in q["sql"])
    assert '"knowledge_document"."text"' not in selects and '"knowledge_chunk"."embedding"' not in selects


def test_deleting_a_knowledge_base_hides_it_at_once_and_purges_in_the_background(make_kb, load_docs, user,
                                                                                django_capture_on_commit_callbacks):
    kb = make_kb()
    load_docs(kb, {f"n{i}.md": note(i) for i in range(3)})
    root = services.kb_index_root(kb.pk)
    services.knowledge_base_delete(user=user, knowledge_base=kb)
    assert not chunks_retrieve(user=user, query="code word", top_k=5)
    row = KnowledgeBase.objects.get(pk=kb.pk)
    assert row.deleted_at is not None and row.delete_progress["documents"] == 3
    seen = []
    assert services.knowledge_base_purge(knowledge_base_id=kb.pk, on_progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (3, 3) and not KnowledgeBase.objects.filter(pk=kb.pk).exists()
    assert not Chunk.objects.exists() and not root.exists()
