"""Retrieval metrics on hand-computed examples and the BEIR loader on a tiny BEIR-format dataset."""
from __future__ import annotations

import gzip
import json
import math

import pytest

from apps.knowledge.rag.evaluation import evaluate_run, load_beir, mrr_at_k, ndcg_at_k, recall_at_k


def test_ndcg_hand_computed():
    relevance = {"a": 1, "b": 1}
    # relevant at ranks 2 and 4: DCG = 1/log2(3) + 1/log2(5); ideal = 1 + 1/log2(3)
    expected = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(["x", "a", "y", "b"], relevance, 10) == pytest.approx(expected)
    assert ndcg_at_k(["a", "b", "x"], relevance, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "a", "y", "b"], relevance, 1) == 0.0


def test_ndcg_uses_linear_graded_gain_like_trec_eval():
    relevance = {"a": 2, "b": 1}
    expected = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert ndcg_at_k(["b", "a"], relevance, 10) == pytest.approx(expected)


def test_ndcg_ideal_is_truncated_at_k():
    relevance = {"a": 1, "b": 1, "c": 1}
    assert ndcg_at_k(["a", "x"], relevance, 2) == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_recall_and_mrr_hand_computed():
    relevance = {"a": 1, "b": 1, "c": 0}
    ranked = ["c", "x", "b", "y", "a"]
    assert recall_at_k(ranked, relevance, 3) == pytest.approx(0.5)
    assert recall_at_k(ranked, relevance, 5) == pytest.approx(1.0)
    assert mrr_at_k(ranked, relevance, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(ranked, relevance, 2) == 0.0


def test_duplicate_documents_in_a_run_count_once():
    assert recall_at_k(["a", "a", "b"], {"a": 1, "b": 1}, 2) == pytest.approx(1.0)
    assert ndcg_at_k(["a", "a"], {"a": 1}, 10) == pytest.approx(1.0)


def test_evaluate_run_averages_over_all_judged_queries():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 1}}
    run = {"q1": ["a"], "q2": ["x", "b"]}
    result = evaluate_run(run, qrels, ndcg_k=(10,), recall_k=(1, 10), mrr_k=(10,))
    assert result["queries"] == 3
    assert result["recall@1"] == pytest.approx(1 / 3)
    assert result["recall@10"] == pytest.approx(2 / 3)
    assert result["mrr@10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert result["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 3)


def test_load_beir_reads_gzip_corpus_crlf_qrels_and_only_query_text(tmp_path):
    corpus = [
        {"_id": "d1", "title": "Cats", "text": "Cats purr.", "metadata": {}},
        {"_id": "d2", "title": "", "text": "Dogs bark.", "metadata": {}},
    ]
    with gzip.open(tmp_path / "corpus.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in corpus))
    queries = [
        {"_id": "1", "text": "do cats purr", "metadata": {"d1": [{"label": "SUPPORT"}]}},
        {"_id": "2", "text": "train only query", "metadata": {}},
    ]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_bytes(b"query-id\tcorpus-id\tscore\r\n1\td1\t1\r\n1\td2\t0\r\n")

    loaded_corpus, loaded_queries, qrels = load_beir(tmp_path)
    assert loaded_corpus == {"d1": {"title": "Cats", "text": "Cats purr."}, "d2": {"title": "", "text": "Dogs bark."}}
    assert loaded_queries == {"1": "do cats purr"}
    assert qrels == {"1": {"d1": 1, "d2": 0}}
