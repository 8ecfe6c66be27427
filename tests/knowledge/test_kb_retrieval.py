"""chunks_retrieve: access rules, validation, fusion stages, cache, and index version swaps."""
from __future__ import annotations

import pytest
from django.contrib.auth.models import AnonymousUser, Group

from apps.core.errors import ApplicationError
from apps.knowledge import services
from apps.knowledge.index_registry import registry
from apps.knowledge.models import Chunk, Document, IndexVersion
from apps.knowledge.selectors import chunks_retrieve, knowledge_bases_visible
from tests.knowledge import kb_files

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("kb_env")]

PARKING = b"# Parking\n\nVisitors park on level minus two of the garage next to the lifts.\n"
LEAVE = b"# Leave\n\nEmployees accrue two days of paid leave per month of service.\n"
FIRE = kb_files.TEXT


@pytest.fixture
def world(make_kb, load_docs, user, other_user, django_user_model):
    """alice owns `private`; `team` is readable by the group `hr`; `open` is public."""
    hr = Group.objects.create(name="hr")
    member = django_user_model.objects.create_user(username="carol", password="pw-carol-123")
    member.groups.add(hr)
    private = make_kb("private", owner=user)
    team = make_kb("team", owner=other_user, groups=[hr])
    public = make_kb("open", owner=other_user, public=True)
    load_docs(private, {"parking.md": PARKING})
    load_docs(team, {"leave.md": LEAVE})
    load_docs(public, {"fire.txt": FIRE})
    return {"private": private, "team": team, "open": public, "member": member}


def _slugs(results):
    return {r.knowledge_base_slug for r in results}


def test_access_rules_decide_what_is_searched(world, user, other_user, staff_user):
    query = "where do visitors park, how much leave, fire assembly point"
    assert _slugs(chunks_retrieve(user=user, query=query, top_k=10)) == {"private", "open"}
    assert _slugs(chunks_retrieve(user=world["member"], query=query, top_k=10)) == {"team", "open"}
    assert _slugs(chunks_retrieve(user=other_user, query=query, top_k=10)) == {"team", "open"}
    assert _slugs(chunks_retrieve(user=staff_user, query=query, top_k=10)) == {"open"}  # is_staff grants nothing
    from django.contrib.auth.models import Group

    staff_user.groups.add(Group.objects.get(name="Knowledge readers"))  # the role that reads every base
    staff_user = type(staff_user).objects.get(pk=staff_user.pk)
    assert _slugs(chunks_retrieve(user=staff_user, query=query, top_k=10)) == {"private", "team", "open"}
    assert _slugs(chunks_retrieve(user=AnonymousUser(), query=query, top_k=10)) == {"open"}
    assert set(knowledge_bases_visible(user=world["member"]).values_list("slug", flat=True)) == {"team", "open"}


@pytest.mark.parametrize("ref", ["private", "does-not-exist"])
def test_asking_for_an_unreadable_knowledge_base_looks_like_a_missing_one(world, other_user, ref):
    with pytest.raises(ApplicationError) as info:
        chunks_retrieve(user=other_user, query="parking", knowledge_bases=[ref])
    assert info.value.code == "knowledge_base_not_found" and info.value.status_code == 404


def test_explicit_knowledge_bases_by_slug_or_id(world, user):
    results = chunks_retrieve(user=user, query="garage parking", knowledge_bases=[world["private"].pk, "open"])
    assert _slugs(results) <= {"private", "open"}
    assert results[0].knowledge_base_slug == "private"


@pytest.mark.parametrize("kwargs,code", [
    ({"query": "   "}, "invalid_query"),
    ({"query": "x" * 2001}, "query_too_long"),
    ({"mode": "semantic"}, "invalid_mode"),
    ({"top_k": 0}, "invalid_top_k"),
    ({"top_k": 1000}, "invalid_top_k"),
    ({"top_k": "5"}, "invalid_top_k"),
    ({"knowledge_bases": "open"}, "invalid_knowledge_bases"),
])
def test_bad_parameters_get_stable_codes(user, kwargs, code):
    params = {"query": "parking", "top_k": 5, "mode": "hybrid"} | kwargs
    with pytest.raises(ApplicationError) as info:
        chunks_retrieve(user=user, **params)
    assert info.value.code == code and info.value.status_code == 400


def test_results_carry_stage_scores_and_citation_fields(world, user):
    hybrid = chunks_retrieve(user=user, query="where do visitors park", knowledge_bases=["private"], mode="hybrid")
    top = hybrid[0]
    assert set(top.scores) == {"dense", "bm25", "fused"} and top.score == top.scores["fused"]
    document = Document.objects.get(pk=top.document_id)
    assert document.text[top.char_start:top.char_end] == top.text
    assert top.heading_path == ["Parking"] and top.index_version == 1
    assert top.url == f"/sources/{top.document_id}/?chunk={top.chunk_id}"
    assert top.to_dict()["scores"]["fused"] == top.score

    dense = chunks_retrieve(user=user, query="where do visitors park", mode="dense")
    assert all(set(r.scores) == {"dense"} and r.score == r.scores["dense"] for r in dense)
    assert [r.score for r in dense] == sorted((r.score for r in dense), reverse=True)
    bm25 = chunks_retrieve(user=user, query="garage", mode="bm25")
    assert [r.knowledge_base_slug for r in bm25] == ["private"] and set(bm25[0].scores) == {"bm25"}


def test_weighted_fusion_and_mmr_are_options_of_the_knowledge_base(make_kb, load_docs, user):
    kb = make_kb("tuned", fusion="weighted", dense_weight=0.7)
    load_docs(kb, {"expenses.md": kb_files.MARKDOWN, "fire.txt": FIRE, "parking.md": PARKING})
    weighted = chunks_retrieve(user=user, query="hotel reimbursement", knowledge_bases=["tuned"], top_k=3)
    assert weighted[0].scores["fused"] <= 1.0 and "Hotel" in weighted[0].text
    kb.mmr_lambda = 0.5
    kb.save()
    diverse = chunks_retrieve(user=user, query="hotel reimbursement", knowledge_bases=["tuned"], top_k=3)
    assert all("mmr" in r.scores for r in diverse) and len({r.chunk_id for r in diverse}) == 3


def test_the_default_fusion_is_the_measured_default_of_the_model(make_kb, load_docs, user):
    from apps.knowledge.embeddings import AUTO_FUSION_OTHERS, MODEL_E5, MODEL_MINILM, served_fusion
    from apps.knowledge.rag.fusion import fuse

    kb = make_kb("fresh")
    assert kb.fusion == "auto" and kb.embedding_model == MODEL_MINILM
    assert served_fusion(kb) == ("zscore", 60, 0.6)
    kb.embedding_model = MODEL_E5
    assert served_fusion(kb) == AUTO_FUSION_OTHERS == ("zscore", 60, 0.5)
    kb.fusion, kb.rrf_k = "rrf", 20  # an editor's (or a calibration's) choice is served as it is
    assert served_fusion(kb) == ("rrf", 20, 0.5)
    kb.refresh_from_db()
    load_docs(kb, {"expenses.md": kb_files.MARKDOWN, "fire.txt": FIRE, "parking.md": PARKING})
    query = "where is the fire assembly point"
    served = chunks_retrieve(user=user, query=query, knowledge_bases=["fresh"], top_k=5)
    dense = chunks_retrieve(user=user, query=query, knowledge_bases=["fresh"], top_k=50, mode="dense")
    bm25 = chunks_retrieve(user=user, query=query, knowledge_bases=["fresh"], top_k=50, mode="bm25")
    expected = fuse("zscore", [(r.chunk_id, r.score) for r in dense], [(r.chunk_id, r.score) for r in bm25],
                    dense_weight=0.6)
    assert [r.chunk_id for r in served] == [i for i, _ in expected][:len(served)]
    assert served[0].scores["fused"] == pytest.approx(expected[0][1])


def test_identical_queries_are_cached_until_a_new_version_is_active(world, user, encode_counter, load_docs):
    first = chunks_retrieve(user=user, query="visitors park", knowledge_bases=["private"])
    encoded = encode_counter["texts"]
    again = chunks_retrieve(user=user, query="  visitors   park ", knowledge_bases=["private"])
    assert encode_counter["texts"] == encoded  # served from the cache: the query was not encoded again
    assert [r.to_dict() for r in again] == [r.to_dict() for r in first]
    load_docs(world["private"], {"more-parking.md": b"# Bikes\n\nBicycles park in the courtyard racks.\n"})
    fresh = chunks_retrieve(user=user, query="visitors park", knowledge_bases=["private"])
    assert encode_counter["texts"] > encoded and fresh[0].index_version == 2


def test_cache_lives_in_redis_in_production(world, user, settings, redis_url, encode_counter):
    import redis

    from tests.helpers import clear_cache

    settings.CACHES = {"default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": redis_url,
                                   "KEY_PREFIX": "kbtest"}}
    clear_cache()
    chunks_retrieve(user=user, query="visitors park", knowledge_bases=["private"])
    keys = redis.Redis.from_url(redis_url).keys("kbtest:*knowledge:retrieve:*")
    assert len(keys) == 1
    encoded = encode_counter["texts"]
    chunks_retrieve(user=user, query="visitors park", knowledge_bases=["private"])
    assert encode_counter["texts"] == encoded
    clear_cache()


def test_deleted_documents_disappear_before_the_index_is_rebuilt(world, user):
    document = Document.objects.get(source_name="parking.md")
    assert chunks_retrieve(user=user, query="garage", knowledge_bases=["private"], mode="bm25")
    # Not executed: the purge task has not run, the index still holds the chunks.
    services.document_delete(document=document, user=user)
    assert chunks_retrieve(user=user, query="garage", knowledge_bases=["private"], mode="bm25") == []


def test_reingest_keeps_serving_the_old_version_until_the_new_one_is_active(make_kb, load_docs, user):
    kb = make_kb()
    load_docs(kb, {"parking.md": PARKING})
    old = chunks_retrieve(user=user, query="garage", knowledge_bases=[kb.pk], mode="bm25")
    document = services.document_import(knowledge_base=kb, user=user, name="parking.md",
                                        data=b"# Parking\n\nVisitors now park in the garage on level three.\n").document
    services.documents_ingest(document_ids=[document.pk], rebuild=False)
    during = chunks_retrieve(user=user, query="garage level", knowledge_bases=[kb.pk], mode="bm25")
    assert [(r.chunk_id, r.text, r.index_version) for r in during] == [(r.chunk_id, r.text, 1) for r in old]
    services.index_rebuild(knowledge_base_id=kb.pk)
    after = chunks_retrieve(user=user, query="garage level", knowledge_bases=[kb.pk], mode="bm25")
    assert after[0].index_version == 2 and "level three" in after[0].text


def test_registry_swaps_on_event_and_heals_a_missed_event(make_kb, load_docs, settings):
    import time

    from apps.core.events import dispatch, make_event

    kb = make_kb()
    load_docs(kb, {"parking.md": PARKING})
    settings.KNOWLEDGE_VERSION_CHECK_SECONDS = 3600
    v1 = registry.bundle(kb.pk)
    assert v1.version == 1
    load_docs(kb, {"leave.md": LEAVE})  # v2 activated; its commit-time event never fires inside a test transaction
    assert registry.bundle(kb.pk) is v1  # stale within the check interval
    dispatch(make_event("knowledge_updated", {"knowledge_base": kb.pk, "slug": kb.slug, "version": 2}, version=2))
    v2 = registry.bundle(kb.pk)
    assert v2.version == 2 and v2 is not v1
    assert v1.bm25_search("garage", 5)  # the old buffer stays usable by requests that still hold it

    settings.KNOWLEDGE_VERSION_CHECK_SECONDS = 0.2
    load_docs(kb, {"fire.txt": FIRE})  # v3, event missed
    time.sleep(0.25)
    assert registry.bundle(kb.pk).version == 3


def test_an_older_build_never_replaces_a_newer_active_version(make_kb, load_docs):
    from apps.knowledge.services import _index_activate

    kb = make_kb()
    load_docs(kb, {"parking.md": PARKING})
    services.index_rebuild(knowledge_base_id=kb.pk, force=True)  # v2 active
    # A build that was allocated before v2 and finishes after it.
    stale = IndexVersion.objects.create(knowledge_base=kb, version=0, source_revision=0)
    assert _index_activate(stale) is False
    assert list(IndexVersion.objects.filter(status="active").values_list("version", flat=True)) == [2]
    stale.refresh_from_db()
    assert stale.status == "retired"


def test_cleanup_removes_retired_versions_and_superseded_chunks_after_the_grace_period(make_kb, load_docs, user):
    from datetime import timedelta
    from pathlib import Path

    from django.utils import timezone

    kb = make_kb()
    load_docs(kb, {"parking.md": PARKING})
    load_docs(kb, {"parking.md": b"# Parking\n\nVisitors park outside.\n"})
    retired = IndexVersion.objects.get(version=1)
    assert retired.status == "retired" and Path(retired.artifact_path).is_dir()
    assert Chunk.objects.filter(superseded_at__isnull=False).exists()
    assert services.index_versions_cleanup() == 0  # within the grace period nothing goes
    later = timezone.now() + timedelta(hours=1)
    assert services.index_versions_cleanup(now=later) == 1
    assert not Path(retired.artifact_path).exists()
    assert not Chunk.objects.filter(superseded_at__isnull=False).exists()
    active = IndexVersion.objects.get(status="active")
    assert Path(active.artifact_path).is_dir() and chunks_retrieve(user=user, query="outside", knowledge_bases=[kb.pk])


@pytest.mark.django_db(transaction=True)
def test_a_search_during_a_rebuild_sees_one_complete_version(make_kb, load_docs, user):
    import threading

    kb = make_kb()
    load_docs(kb, {"parking.md": PARKING, "leave.md": LEAVE})
    stop, seen, errors = threading.Event(), [], []

    def search_loop():
        from django.db import connection

        try:
            while not stop.is_set():
                results = chunks_retrieve(user=user, query="fire assembly parking leave", knowledge_bases=[kb.pk],
                                          top_k=10, mode="bm25")
                seen.append(({r.index_version for r in results}, {r.document_title for r in results}))
        except Exception as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=search_loop)
    thread.start()
    try:
        for _ in range(3):
            load_docs(kb, {"fire.txt": FIRE + b"\nRevision.\n" * (_ + 1)})
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors and seen
    for versions, titles in seen:
        assert len(versions) == 1
        if versions == {1}:
            assert titles <= {"Parking", "Leave"}


@pytest.mark.django_db(transaction=True)
def test_concurrent_rebuilds_get_distinct_versions_and_the_newest_wins(make_kb, load_docs):
    import threading

    kb = make_kb()
    load_docs(kb, {"parking.md": PARKING})
    results, errors = [], []

    def rebuild():
        from django.db import connection

        try:
            results.append(services.index_rebuild(knowledge_base_id=kb.pk, force=True))
        except Exception as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=rebuild) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    # One build per base at a time: a request arriving during a build is coalesced into it ("queued").
    built = sorted(r.version for r in results if r.status == "built")
    assert built and len(set(built)) == len(built) and {r.status for r in results} <= {"built", "queued"}
    assert list(IndexVersion.objects.filter(status="active").values_list("version", flat=True)) == [built[-1]]
    assert set(IndexVersion.objects.exclude(version=built[-1]).values_list("status", flat=True)) == {"retired"}


def test_reranker_by_local_path_reorders_and_reports_its_scores(world, user, settings):
    """No cross-encoder is bundled; the bundled MiniLM directory loads as one (with an untrained scoring
    head), which exercises the real rerank path: scores per result, final order by rerank score."""
    from apps.knowledge.rag.embedder import default_model_path
    from apps.knowledge.selectors import _RERANKER

    settings.RERANKER_MODEL_PATH = default_model_path()
    try:
        results = chunks_retrieve(user=user, query="where do visitors park", top_k=3)
        assert results and all("rerank" in r.scores and r.score == r.scores["rerank"] for r in results)
        assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
        world["open"].use_reranker = False
        world["open"].save()
        world["private"].use_reranker = False
        world["private"].save()
        plain = chunks_retrieve(user=user, query="where do visitors park", top_k=3)
        assert all("rerank" not in r.scores for r in plain)
    finally:
        _RERANKER.clear()
