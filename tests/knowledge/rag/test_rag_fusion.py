"""Rank fusion and MMR on hand-computed examples."""
from __future__ import annotations

import numpy as np
import pytest

from apps.knowledge.rag.fusion import mmr, rrf, weighted_fusion


def test_rrf_matches_hand_computation():
    dense = [(1, 0.9), (2, 0.8), (3, 0.7)]
    bm25 = [(3, 12.0), (4, 9.0), (1, 1.0)]
    fused = dict(rrf([dense, bm25], k=60))
    assert fused[1] == pytest.approx(1 / 61 + 1 / 63)
    assert fused[3] == pytest.approx(1 / 63 + 1 / 61)
    assert fused[2] == pytest.approx(1 / 62)
    assert fused[4] == pytest.approx(1 / 62)
    order = [doc_id for doc_id, _ in rrf([dense, bm25], k=60)]
    assert order == [1, 3, 2, 4], "ties are broken by best rank, then by id"


def test_rrf_weights_scale_each_list():
    fused = dict(rrf([[(1, 1.0)], [(2, 1.0)]], k=10, weights=[2.0, 1.0]))
    assert fused == {1: pytest.approx(2 / 11), 2: pytest.approx(1 / 11)}


def test_rrf_ignores_raw_score_scales():
    assert [d for d, _ in rrf([[(7, 1e9), (8, 1e-9)]])] == [7, 8]


def test_rrf_of_nothing_is_empty_and_rejects_bad_weights():
    assert rrf([]) == [] and rrf([[], []]) == []
    with pytest.raises(ValueError):
        rrf([[(1, 1.0)]], weights=[1.0, 2.0])
    with pytest.raises(ValueError):
        rrf([[(1, 1.0)]], weights=[-1.0])


def test_weighted_fusion_is_a_convex_combination_of_min_max_scores():
    dense = [(1, 0.9), (2, 0.5), (3, 0.1)]
    bm25 = [(3, 20.0), (1, 10.0), (4, 0.0)]
    fused = dict(weighted_fusion([dense, bm25], weights=[3.0, 1.0]))
    assert fused[1] == pytest.approx(0.75 * 1.0 + 0.25 * 0.5)
    assert fused[2] == pytest.approx(0.75 * 0.5)
    assert fused[3] == pytest.approx(0.75 * 0.0 + 0.25 * 1.0)
    assert fused[4] == pytest.approx(0.0)
    assert max(fused.values()) <= 1.0


def test_weighted_fusion_constant_list_normalises_to_one():
    assert dict(weighted_fusion([[(1, 5.0), (2, 5.0)]], weights=[1.0])) == {1: 1.0, 2: 1.0}
    with pytest.raises(ValueError):
        weighted_fusion([[(1, 1.0)]], weights=[0.0])


def test_mmr_with_lambda_one_is_relevance_order():
    vectors = np.eye(4, dtype=np.float32)
    query = np.array([0.1, 0.9, 0.5, 0.3], dtype=np.float32)
    assert [d for d, _ in mmr([10, 11, 12, 13], vectors, query, lambda_=1.0, top_k=4)] == [11, 12, 13, 10]


def test_mmr_skips_near_duplicates():
    def unit(*values):
        vector = np.array(values, dtype=np.float32)
        return vector / np.linalg.norm(vector)

    base, near_duplicate, different = unit(1, 0, 0), unit(0.99, 0.141, 0), unit(0.6, 0, 0.8)
    vectors = np.stack([base, near_duplicate, different])
    query = unit(1, 0, 0.2)
    assert [d for d, _ in mmr([1, 2, 3], vectors, query, lambda_=1.0, top_k=2)] == [1, 2]
    picked = mmr([1, 2, 3], vectors, query, lambda_=0.5, top_k=2)
    assert [d for d, _ in picked] == [1, 3]
    assert picked[0][1] == pytest.approx(0.5 * float(query @ base))
    assert picked[1][1] == pytest.approx(0.5 * float(query @ different) - 0.5 * float(base @ different))


def test_mmr_edge_cases():
    assert mmr([], np.zeros((0, 3)), np.ones(3), top_k=5) == []
    assert len(mmr([1, 2], np.eye(2), np.ones(2), top_k=10)) == 2
    with pytest.raises(ValueError):
        mmr([1], np.eye(2), np.ones(2))
    with pytest.raises(ValueError):
        mmr([1, 2], np.eye(2), np.ones(2), lambda_=1.5)
