"""Segments, views with tombstones, merges and compressed dense segments (pure rag/, no Django)."""
from __future__ import annotations

import numpy as np
import pytest

from apps.knowledge.rag import index as index_module
from apps.knowledge.rag.analyzer import get_analyzer
from apps.knowledge.rag.index import (
    BM25Index,
    DenseBuilder,
    DenseIndex,
    IndexBundle,
    SegmentBatch,
    ViewLayout,
    ViewSegment,
    delete_unreferenced_segments,
    list_segments,
    plan_merge,
    referenced_segments,
    write_segment,
    write_view,
)

TEXTS = [
    "The refund policy allows returns within thirty days of delivery.",
    "Employees accrue two days of paid leave every month.",
    "Refunds for gift cards are not possible, refunds of items are.",
    "Hotel expenses are reimbursed up to 150 EUR per night.",
    "The cat sat on the mat next to the refund desk.",
    "Delivery takes three days; express delivery takes one day.",
]


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def batch(ids, texts, vectors, doc_ids=None) -> SegmentBatch:
    ids = np.asarray(ids, dtype=np.int64)
    return SegmentBatch(ids, np.asarray(doc_ids if doc_ids is not None else ids, dtype=np.int64), vectors, texts)


def test_bm25_postings_score_exactly_as_bm25s_lucene():
    import bm25s

    analyzer = get_analyzer()
    ids = np.arange(len(TEXTS))
    ours = BM25Index(ids, TEXTS, analyzer=analyzer)
    reference = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    reference.index([analyzer.tokenize(t) for t in TEXTS], show_progress=False)
    for query in ("refund delivery", "refunds refunds gift", "days", "hotel night EUR"):
        tokens = [reference.vocab_dict[t] for t in analyzer.tokenize(query) if t in reference.vocab_dict]
        expected = np.asarray(reference.get_scores_from_ids(tokens))
        got = dict(ours.search(query, len(TEXTS)))
        np.testing.assert_allclose([got.get(i, 0.0) for i in ids], expected, rtol=1e-5, atol=1e-6)


def test_a_view_scores_the_same_however_it_is_cut_into_segments(tmp_path):
    vectors = unit(len(TEXTS), 16, seed=1)
    ids = np.arange(100, 100 + len(TEXTS))
    one = write_segment(tmp_path, "s000001", [batch(ids, TEXTS, vectors)], dim=16, expected=len(ids))
    left = write_segment(tmp_path, "s000002", [batch(ids[:2], TEXTS[:2], vectors[:2])], dim=16)
    right = write_segment(tmp_path, "s000003", [batch(ids[2:], TEXTS[2:], vectors[2:])], dim=16)
    whole = IndexBundle.load(write_view(tmp_path, 1, [ViewSegment(one["name"])], meta={}, dim=16))
    split = IndexBundle.load(write_view(tmp_path, 2, [ViewSegment(left["name"]), ViewSegment(right["name"])],
                                        meta={}, dim=16))
    assert len(split.parts) == 2 and split.count == whole.count == len(TEXTS)
    for query in ("refund", "delivery days", "paid leave"):
        got, expected = split.bm25_search(query, 10), whole.bm25_search(query, 10)
        assert [i for i, _ in got] == [i for i, _ in expected]
        assert [s for _, s in got] == pytest.approx([s for _, s in expected], rel=1e-5)
    assert [i for i, _ in split.dense_search(vectors[4], 3)] == [i for i, _ in whole.dense_search(vectors[4], 3)]


def test_tombstoned_chunks_are_never_returned_and_k_live_hits_still_come_back(tmp_path):
    vectors = unit(200, 16, seed=2)
    ids = np.arange(200)
    texts = [f"refund note number {i}" for i in range(200)]
    seg = write_segment(tmp_path, "s000001", [batch(ids, texts, vectors, doc_ids=ids // 10)], dim=16, expected=200)
    dead = np.arange(0, 200, 2)  # half the chunks deleted
    view = IndexBundle.load(write_view(tmp_path, 2, [ViewSegment(seg["name"], dead)], meta={}, dim=16))
    assert view.count == 100
    hits = view.dense_search(vectors[0], 10)  # the query is a deleted chunk's own vector
    assert len(hits) == 10 and not set(i for i, _ in hits) & set(dead.tolist())
    bm25 = view.bm25_search("refund note", 150)
    assert len(bm25) == 100 and not set(i for i, _ in bm25) & set(dead.tolist())
    with pytest.raises(KeyError):
        view.vectors([0])
    np.testing.assert_allclose(view.vectors([1]), vectors[[1]], atol=1e-6)
    layout = ViewLayout.read(view.path)
    assert layout.live_ids(seg["name"]).tolist() == list(range(1, 200, 2))


def test_versions_share_segments_in_memory_and_unreferenced_ones_are_removed(tmp_path):
    vectors = unit(4, 8, seed=3)
    first = write_segment(tmp_path, "s000001", [batch([1, 2], TEXTS[:2], vectors[:2])], dim=8)
    second = write_segment(tmp_path, "s000002", [batch([3, 4], TEXTS[2:4], vectors[2:])], dim=8)
    v1 = IndexBundle.load(write_view(tmp_path, 1, [ViewSegment(first["name"])], meta={}, dim=8))
    v2 = IndexBundle.load(write_view(tmp_path, 2, [ViewSegment(first["name"]), ViewSegment(second["name"])],
                                     meta={}, dim=8))
    assert v2.parts[0].segment is v1.parts[0].segment and v2.loaded_segments == 1  # only the new one was read
    orphan = write_segment(tmp_path, "s000003", [batch([9], ["orphan"], vectors[:1])], dim=8)
    assert referenced_segments(tmp_path) == {first["name"], second["name"]}
    assert delete_unreferenced_segments(tmp_path, referenced_segments(tmp_path), older_than_s=3600) == []
    assert delete_unreferenced_segments(tmp_path, referenced_segments(tmp_path), older_than_s=-1) == [orphan["name"]]
    assert orphan["name"] not in list_segments(tmp_path)


def test_rewriting_a_segment_with_the_same_content_reuses_it(tmp_path):
    vectors = unit(3, 8, seed=4)
    a = write_segment(tmp_path, "s000001", [batch([1, 2, 3], TEXTS[:3], vectors)], dim=8)
    b = write_segment(tmp_path, "s000001", [batch([1, 2, 3], TEXTS[:3], vectors)], dim=8)
    assert a == b and list_segments(tmp_path) == [a["name"]]


def test_merge_plan_uses_size_tiers_and_rewrites_tombstone_heavy_segments():
    small = [{"name": f"s{i}", "count": 5, "tombstones": 0} for i in range(3)]
    big = {"name": "big", "count": 100_000, "tombstones": 0}
    assert plan_merge([big, *small]) == []  # three small ones: below the merge factor
    assert plan_merge([big, *small, {"name": "s9", "count": 6}]) == ["s0", "s1", "s2", "s9"]
    assert plan_merge([{"name": "big", "count": 100_000, "tombstones": 40_000}]) == ["big"]


def test_streamed_dense_build_equals_one_shot_and_ivfpq_recall_against_exact(tmp_path):
    vectors = unit(3000, 32, seed=5)
    ids = np.arange(3000, dtype=np.int64) * 3
    builder = DenseBuilder(32, "flat")
    for start in range(0, 3000, 700):
        builder.add(ids[start:start + 700], vectors[start:start + 700])
    streamed, exact = builder.finish(), DenseIndex(ids, vectors)
    queries = unit(20, 32, seed=6)
    assert [streamed.search(q, 5) for q in queries] == [exact.search(q, 5) for q in queries]

    from apps.knowledge.rag import index as index_module

    centres = unit(50, 32, seed=7)
    rng = np.random.default_rng(8)
    n = 24_000
    clustered = centres[rng.integers(0, 50, n)] + 0.35 * rng.standard_normal((n, 32)).astype(np.float32)
    clustered /= np.linalg.norm(clustered, axis=1, keepdims=True)
    big_ids = np.arange(n, dtype=np.int64)
    seg = write_segment(tmp_path, "s000010", [batch(big_ids, ["x"] * n, clustered)], dim=32, expected=n,
                        compression="ivfpq")
    assert seg["dense_kind"] == "ivfpq" and n >= index_module.IVFPQ_MIN_VECTORS
    view = IndexBundle.load(write_view(tmp_path, 10, [ViewSegment(seg["name"])], meta={}, dim=32), mmap=True)
    flat = DenseIndex(big_ids, clustered)
    probes = clustered[rng.integers(0, n, 50)] + 0.1 * rng.standard_normal((50, 32)).astype(np.float32)
    recall = np.mean([len({i for i, _ in view.dense_search(q, 10)} & {i for i, _ in flat.search(q, 10)}) / 10
                      for q in probes])
    # 32-d vectors in 8-byte codes on tight synthetic clusters (a hard case): the 384-d figures with real
    # embeddings are in docs/benchmarks.md. This guards against a broken IVF-PQ path (random would be ~0.0004).
    assert recall >= 0.45, recall
    assert view.parts[0].segment.dense.mmapped and view.nbytes() < flat.nbytes()


def _bilingual_base(dim: int = 64, per_group: int = 60, seed: int = 3):
    """Chinese and English chunks whose vectors carry a language direction (e0 / e1) besides their topic,
    the way a multilingual encoder's do, and an English chunk's topic asked in "Chinese" (e0)."""
    rng = np.random.default_rng(seed)

    def unit_vec(v):
        return v / np.linalg.norm(v)

    def topic():
        v = rng.standard_normal(dim)
        v[:2] = 0
        return unit_vec(v)

    e0, e1 = np.eye(dim)[0], np.eye(dim)[1]
    zh = [unit_vec(0.8 * e0 + 0.6 * topic()) for _ in range(per_group)]
    en_topics = [topic() for _ in range(per_group)]
    en = [unit_vec(0.8 * e1 + 0.6 * t) for t in en_topics]
    vectors = np.array(zh + en, dtype=np.float32)
    texts = [f"退款政策的第{i}条说明" for i in range(per_group)] + [f"Refund policy clause {i} explains"
                                                                   for i in range(per_group)]
    query = unit_vec(0.6 * e0 + 0.8 * en_topics[7]).astype(np.float32)
    return vectors, texts, query, per_group + 7  # the row of the English passage asked for


def test_dense_search_corrects_the_language_bias_of_a_bilingual_base(tmp_path):
    vectors, texts, query, wanted_row = _bilingual_base()
    ids = np.arange(1, len(texts) + 1)
    seg = write_segment(tmp_path, "s000001", [batch(ids, texts, vectors)], dim=64, expected=len(ids))
    view = IndexBundle.load(write_view(tmp_path, 1, [ViewSegment(seg["name"])], meta={}, dim=64))
    raw = np.argsort(-(vectors @ query))[:3]
    assert all(row < 60 for row in raw)  # by raw similarity, Chinese chunks crowd out the English answer
    assert view.group_means is not None
    hits = view.dense_search(query, 3)
    assert hits[0][0] == ids[wanted_row] and len(hits) == 3
    # Half of each group's mean similarity is taken off its scores.
    mean_en = vectors[60:].mean(axis=0)
    expected = float(vectors[wanted_row] @ query) - index_module.LANGUAGE_BIAS_CORRECTION * float(mean_en @ query)
    assert hits[0][1] == pytest.approx(expected, abs=1e-5)
    # Deleted chunks stay out of the grouped searches.
    dead = np.array([ids[wanted_row]])
    view2 = IndexBundle.load(write_view(tmp_path, 2, [ViewSegment(seg["name"], dead)], meta={}, dim=64))
    hits2 = view2.dense_search(query, 5)
    assert len(hits2) == 5 and ids[wanted_row] not in {i for i, _ in hits2}


def test_the_language_bias_correction_needs_enough_chunks_of_each_script(tmp_path):
    vectors, texts, query, _ = _bilingual_base(per_group=index_module.LANGUAGE_GROUP_MIN_CHUNKS)
    keep = list(range(index_module.LANGUAGE_GROUP_MIN_CHUNKS)) + [len(texts) - 1]  # one English chunk only
    ids = np.arange(1, len(keep) + 1)
    seg = write_segment(tmp_path, "s000001", [batch(ids, [texts[i] for i in keep], vectors[keep])], dim=64)
    view = IndexBundle.load(write_view(tmp_path, 1, [ViewSegment(seg["name"])], meta={}, dim=64))
    assert view.group_means is None  # a single chunk's "mean" is that chunk: no correction
    hits = view.dense_search(query, 3)
    assert [s for _, s in hits] == pytest.approx(sorted((vectors[keep] @ query).tolist(), reverse=True)[:3], abs=1e-5)
