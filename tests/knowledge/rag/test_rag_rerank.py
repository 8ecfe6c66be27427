"""Reranker protocol and loading (no cross-encoder model is bundled)."""
from __future__ import annotations

import re

import pytest

from apps.knowledge.rag.errors import RerankerUnavailable
from apps.knowledge.rag.rerank import CrossEncoderReranker, Reranker, load_reranker, rerank_results


class TermOverlapReranker:
    """A tiny real reranker: fraction of query words present in the passage."""

    def rerank(self, query: str, passages: list[str]) -> list[float]:
        terms = set(re.findall(r"\w+", query.lower()))
        return [len(terms & set(re.findall(r"\w+", p.lower()))) / max(len(terms), 1) for p in passages]


def test_a_plain_class_satisfies_the_protocol():
    assert isinstance(TermOverlapReranker(), Reranker)
    assert not isinstance(object(), Reranker)


def test_rerank_results_orders_by_score_and_keeps_ids():
    results = [(1, "cats and dogs"), (2, "refund policy for shoes"), (3, "shoes")]
    ranked = rerank_results(TermOverlapReranker(), "refund for shoes", results)
    assert [doc_id for doc_id, _ in ranked] == [2, 3, 1]
    assert ranked[0][1] == pytest.approx(1.0)
    assert rerank_results(TermOverlapReranker(), "refund", results, top_k=1) == [(2, 1.0)]
    assert rerank_results(TermOverlapReranker(), "x", []) == []


def test_rerank_results_rejects_a_reranker_returning_wrong_count():
    class Broken:
        def rerank(self, query, passages):
            return [1.0]

    with pytest.raises(ValueError):
        rerank_results(Broken(), "q", [(1, "a"), (2, "b")])


@pytest.mark.parametrize("path", [None, "", "   "])
def test_no_configured_path_means_no_reranker(path):
    assert load_reranker(path) is None


def test_missing_model_path_fails_with_a_clear_error(tmp_path):
    with pytest.raises(RerankerUnavailable, match="never downloaded"):
        load_reranker(tmp_path / "ms-marco-MiniLM")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RerankerUnavailable):
        CrossEncoderReranker(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        load_reranker("cross-encoder/ms-marco-MiniLM-L-6-v2")
