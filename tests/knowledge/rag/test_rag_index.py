"""Dense and BM25 indexes, on-disk versions and loaded bundles."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from apps.knowledge.rag import index as index_module
from apps.knowledge.rag.errors import IndexLoadError
from apps.knowledge.rag.index import (
    BM25Index,
    DenseIndex,
    IndexBundle,
    bm25_tokenize,
    delete_version,
    list_versions,
    remove_stale_tmp,
    write_index_version,
)


def random_unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def clustered_unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Vectors around a few centres: closer to real embeddings than isotropic noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, 20, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def brute_force(ids: np.ndarray, vectors: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    scores = vectors @ query
    return [int(ids[i]) for i in np.argsort(-scores, kind="stable")[:k]]


DOCS = {
    101: "The refund policy allows returns within thirty days of delivery.",
    205: "Employees accrue two days of paid leave every month.",
    307: "Refunds for gift cards are not possible.",
    999: "Hotel expenses are reimbursed up to 150 EUR per night.",
    1000: "The cat sat on the mat.",
}


# ---------------------------------------------------------------------------------------------
# Dense
# ---------------------------------------------------------------------------------------------


def test_flat_index_matches_brute_force_and_round_trips(tmp_path):
    ids = np.arange(1000, 1300, dtype=np.int64) * 7
    vectors = random_unit_vectors(300, 32, seed=1)
    dense = DenseIndex(ids, vectors)
    assert dense.kind == "flat" and dense.count == 300 and dense.dim == 32
    query = vectors[17]
    results = dense.search(query, 10)
    assert [doc_id for doc_id, _ in results] == brute_force(ids, vectors, query, 10)
    assert results[0] == (int(ids[17]), pytest.approx(1.0, abs=1e-5))
    dense.save(tmp_path)
    loaded = DenseIndex.load(tmp_path)
    assert loaded.kind == "flat" and loaded.search(query, 10) == results
    np.testing.assert_allclose(loaded.vectors([int(ids[3]), int(ids[5])]), vectors[[3, 5]], atol=1e-6)


def test_hnsw_above_threshold_has_high_recall_and_keeps_ef_search_after_load(tmp_path):
    ids = np.arange(2000, dtype=np.int64) + 10_000
    vectors = clustered_unit_vectors(2000, 32, seed=2)
    dense = DenseIndex(ids, vectors, hnsw_threshold=1000, ef_search=80)
    assert dense.kind == "hnsw"
    queries = clustered_unit_vectors(50, 32, seed=3)
    hits = 0
    for query in queries:
        hits += len({i for i, _ in dense.search(query, 10)} & set(brute_force(ids, vectors, query, 10)))
    assert hits / (50 * 10) >= 0.95
    dense.save(tmp_path)
    loaded = DenseIndex.load(tmp_path)
    assert loaded.kind == "hnsw" and loaded.ef_search == 80
    import faiss

    assert faiss.downcast_index(loaded._index.index).hnsw.efSearch == 80
    assert loaded.search(queries[0], 10) == dense.search(queries[0], 10)
    np.testing.assert_allclose(loaded.vectors([10_005]), vectors[[5]], atol=1e-6)


def test_dense_search_handles_small_k_large_k_and_empty_index():
    vectors = random_unit_vectors(5, 8, seed=4)
    dense = DenseIndex([5, 4, 3, 2, 1], vectors)
    assert len(dense.search(vectors[0], 50)) == 5
    assert dense.search(vectors[0], 0) == []
    empty = DenseIndex(np.zeros(0, dtype=np.int64), np.zeros((0, 8), dtype=np.float32))
    assert empty.search(vectors[0], 10) == []
    with pytest.raises(ValueError):
        dense.search(np.ones(9, dtype=np.float32), 3)


@pytest.mark.parametrize(
    "ids,vectors",
    [([1, 1], np.ones((2, 4))), ([1, 2, 3], np.ones((2, 4))), ([1], np.ones(4))],
)
def test_dense_rejects_inconsistent_input(ids, vectors):
    with pytest.raises(ValueError):
        DenseIndex(ids, vectors)


# ---------------------------------------------------------------------------------------------
# BM25
# ---------------------------------------------------------------------------------------------


def test_bm25_tokenizer_stems_and_drops_stopwords():
    assert bm25_tokenize("The Refunds are REFUNDED, refunding!") == ["refund", "refund", "refund"]
    assert bm25_tokenize("the and of a") == []


def test_bm25_ranks_by_term_match_and_round_trips(tmp_path):
    bm25 = BM25Index(list(DOCS), list(DOCS.values()))
    results = bm25.search("refund for gift cards", 10)
    assert [doc_id for doc_id, _ in results][:2] == [307, 101]
    assert all(score > 0 for _, score in results)
    assert 1000 not in {doc_id for doc_id, _ in results}
    bm25.save(tmp_path)
    loaded = BM25Index.load(tmp_path)
    assert loaded.search("refund for gift cards", 10) == results
    assert [doc_id for doc_id, _ in loaded.search("hotels", 1)] == [999]


def test_bm25_tolerates_documents_without_indexable_words(tmp_path):
    bm25 = BM25Index([1, 2, 3], ["!!", "refund requested", "a"])
    assert [doc_id for doc_id, _ in bm25.search("refunds", 5)] == [2]
    only_noise = BM25Index([1, 2], ["!!", "a"])
    assert only_noise.search("refunds", 5) == []
    only_noise.save(tmp_path)
    assert BM25Index.load(tmp_path).count == 2


@pytest.mark.parametrize("query", ["", "   ", "the of and", "zyxwvut", "!!!"])
def test_bm25_queries_without_known_terms_return_nothing(query):
    assert BM25Index(list(DOCS), list(DOCS.values())).search(query, 5) == []


def test_bm25_empty_index_round_trips(tmp_path):
    bm25 = BM25Index([], [])
    assert bm25.search("anything", 3) == []
    bm25.save(tmp_path)
    assert BM25Index.load(tmp_path).search("anything", 3) == []


# ---------------------------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------------------------


def _corpus(embedder):
    ids = np.array(list(DOCS), dtype=np.int64)
    texts = list(DOCS.values())
    return ids, embedder.encode(texts), texts


def _entries(root: Path) -> list[str]:
    """Version directories and leftovers at the top (the shared ``segments`` directory aside)."""
    return sorted(entry.name for entry in root.iterdir() if entry.name != "segments")


def test_written_version_loads_and_searches_with_real_embeddings(tmp_path, embedder):
    ids, vectors, texts = _corpus(embedder)
    path = write_index_version(tmp_path, 3, ids=ids, vectors=vectors, texts=texts, meta={"model_id": embedder.model_id, "kb": 7})
    assert path == tmp_path / "v000003"
    assert _entries(tmp_path) == ["v000003"], "no temporary directory may remain"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["version"] == 3 and manifest["count"] == 5 and manifest["dim"] == 384
    assert manifest["model_id"] == embedder.model_id and manifest["dense_kind"] == "flat"
    assert manifest["meta"] == {"model_id": embedder.model_id, "kb": 7}

    bundle = IndexBundle.load(path)
    assert bundle.version == 3 and bundle.count == 5 and bundle.model_id == embedder.model_id
    query = "Can I get my money back for a gift card?"
    query_vec = embedder.encode_query(query)
    assert bundle.dense_search(query_vec, 2)[0][0] in (307, 101)
    assert bundle.bm25_search(query, 1)[0][0] == 307
    hybrid = bundle.hybrid_search(query, query_vec, k=3)
    assert hybrid[0][0] == 307 and len(hybrid) == 3
    np.testing.assert_allclose(bundle.vectors([205]), vectors[[1]], atol=1e-6)


def test_rewriting_a_version_with_same_content_is_a_no_op(tmp_path):
    ids = np.array([1, 2, 3], dtype=np.int64)
    vectors = random_unit_vectors(3, 16, seed=5)
    texts = ["alpha", "beta", "gamma"]
    path = write_index_version(tmp_path, 1, ids=ids, vectors=vectors, texts=texts, meta={"model_id": "m"})
    before = (path / "manifest.json").read_text()
    inode = path.stat().st_ino
    again = write_index_version(tmp_path, 1, ids=ids, vectors=vectors, texts=texts, meta={"model_id": "m"})
    assert again == path and path.stat().st_ino == inode
    assert (path / "manifest.json").read_text() == before
    assert _entries(tmp_path) == ["v000001"]


def test_rewriting_a_version_with_new_content_replaces_it(tmp_path):
    ids = np.array([1, 2, 3], dtype=np.int64)
    vectors = random_unit_vectors(3, 16, seed=6)
    write_index_version(tmp_path, 1, ids=ids, vectors=vectors, texts=["a", "b", "c"], meta={"model_id": "m"})
    path = write_index_version(tmp_path, 1, ids=ids, vectors=vectors, texts=["a", "b", "zebra"], meta={"model_id": "m"})
    assert [doc_id for doc_id, _ in IndexBundle.load(path).bm25_search("zebra", 1)] == [3]
    assert _entries(tmp_path) == ["v000001"]


def test_crash_mid_write_leaves_previous_version_loadable_and_no_temp_dir(tmp_path, monkeypatch):
    ids = np.array([1, 2], dtype=np.int64)
    vectors = random_unit_vectors(2, 16, seed=7)
    write_index_version(tmp_path, 1, ids=ids, vectors=vectors, texts=["old one", "old two"], meta={"model_id": "m"})

    def exploding_save(self, directory):
        (Path(directory) / "partial.bin").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(BM25Index, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        write_index_version(tmp_path, 2, ids=ids, vectors=vectors, texts=["new", "new"], meta={"model_id": "m"})
    with pytest.raises(OSError, match="disk full"):
        write_index_version(tmp_path, 1, ids=ids, vectors=vectors, texts=["changed", "x"], meta={"model_id": "m"})
    assert _entries(tmp_path) == ["v000001"]
    assert list_versions(tmp_path) == [1]
    bundle = IndexBundle.load(tmp_path / "v000001")
    assert bundle.bm25_search("old", 2)


def test_killed_writer_leftovers_are_never_loaded_and_get_cleaned(tmp_path):
    ids = np.array([1], dtype=np.int64)
    vectors = random_unit_vectors(1, 8, seed=8)
    write_index_version(tmp_path, 1, ids=ids, vectors=vectors, texts=["x"], meta={})
    leftover = tmp_path / "v000002.tmp-deadbeef"
    leftover.mkdir()
    (leftover / "dense.faiss").write_bytes(b"partial")
    assert list_versions(tmp_path) == [1]
    with pytest.raises(IndexLoadError):
        IndexBundle.load(leftover)
    assert remove_stale_tmp(tmp_path, older_than_s=3600) == []
    old = time.time() - 7200
    os.utime(leftover, (old, old))
    assert remove_stale_tmp(tmp_path, older_than_s=3600) == [leftover]
    assert _entries(tmp_path) == ["v000001"]


def test_directory_without_manifest_or_with_mismatched_files_is_rejected(tmp_path):
    with pytest.raises(IndexLoadError):
        IndexBundle.load(tmp_path / "v000009")
    ids = np.array([1, 2], dtype=np.int64)
    path = write_index_version(tmp_path, 4, ids=ids, vectors=random_unit_vectors(2, 8, seed=9), texts=["a", "b"], meta={})
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").unlink()
    with pytest.raises(IndexLoadError):
        IndexBundle.load(path)
    manifest["count"] = 3
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexLoadError):
        IndexBundle.load(path)


def test_concurrent_writers_of_the_same_version_agree(tmp_path):
    ids = np.arange(50, dtype=np.int64)
    vectors = random_unit_vectors(50, 16, seed=10)
    texts = [f"document number {i}" for i in range(50)]
    paths, failures = [], []

    def write():
        try:
            paths.append(write_index_version(tmp_path, 5, ids=ids, vectors=vectors, texts=texts, meta={"m": 1}))
        except Exception as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert set(paths) == {tmp_path / "v000005"}
    assert _entries(tmp_path) == ["v000005"]
    assert IndexBundle.load(tmp_path / "v000005").count == 50


def test_versions_are_listed_in_order_and_deleted_atomically(tmp_path):
    for version in (10, 2, 7):
        write_index_version(
            tmp_path, version, ids=[1], vectors=random_unit_vectors(1, 8, seed=version), texts=["t"], meta={}
        )
    assert list_versions(tmp_path) == [2, 7, 10]
    assert delete_version(tmp_path, 7) is True
    assert delete_version(tmp_path, 7) is False
    assert list_versions(tmp_path) == [2, 10]
    assert _entries(tmp_path) == ["v000002", "v000010"]


def test_version_above_threshold_is_written_as_hnsw(tmp_path):
    vectors = clustered_unit_vectors(300, 16, seed=11)
    path = write_index_version(
        tmp_path, 1, ids=np.arange(300), vectors=vectors, texts=["t"] * 300, meta={}, hnsw_threshold=100
    )
    bundle = IndexBundle.load(path)
    assert bundle.manifest["dense_kind"] == "hnsw" and bundle.dense.kind == "hnsw"
    assert bundle.dense_search(vectors[42], 1)[0][0] == 42


def test_exchange_swaps_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "marker").write_text("A")
    (b / "marker").write_text("B")
    if not index_module._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) unavailable on this filesystem")
    assert (a / "marker").read_text() == "B" and (b / "marker").read_text() == "A"
