"""Fusion calibration on training queries: z-score fusion, the grid search, min_gain, cross-validation."""
from __future__ import annotations

import numpy as np
import pytest

from apps.knowledge.rag import calibration
from apps.knowledge.rag.calibration import QueryCandidates, RankingParams
from apps.knowledge.rag.fusion import fuse, weighted_fusion


def test_zscore_fusion_standardises_each_list_and_absence_scores_the_floor():
    dense = [(1, 0.9), (2, 0.5), (3, 0.1)]
    bm25 = [(3, 30.0), (4, 10.0)]
    fused = dict(weighted_fusion([dense, bm25], [0.5, 0.5], normalization="zscore"))
    assert set(fused) == {1, 2, 3, 4}
    # 3 is last in dense but first in BM25; 4 is absent from dense, so it gets dense's floor there.
    assert fused[3] > fused[4] and fused[1] > fused[2]
    assert fused[4] == pytest.approx(0.5 * (-1.2247449) + 0.5 * (-1.0), abs=1e-6)
    with pytest.raises(ValueError):
        weighted_fusion([dense], normalization="softmax")
    with pytest.raises(ValueError):
        fuse("borda", dense, bm25)
    assert [i for i, _ in fuse("rrf", dense, bm25, rrf_k=60)][0] == 3  # in both lists


def _queries(n: int, seed: int = 1) -> list[QueryCandidates]:
    """Synthetic training queries where BM25 scores separate the relevant id (0) by a wide margin while
    dense ranks it third behind near-ties: RRF (ranks only) prefers id 1, a score fusion puts 0 first."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        dense = [(1, 0.80), (2, 0.795), (0, 0.79)] + [(i, 0.5 - 0.01 * i) for i in range(3, 20)]
        bm25 = [(0, 25.0 + rng.random()), (1, 6.0), (2, 5.5)] + [(i, 5.0 - 0.1 * i) for i in range(6, 20)]
        out.append(QueryCandidates(dense, bm25))
    return out


def _mrr(index, ranked):
    ids = [i for i, _ in ranked[:10]]
    return 1.0 / (ids.index(0) + 1) if 0 in ids else 0.0


def test_choose_finds_a_better_setting_and_keeps_the_current_one_without_a_gain():
    queries = _queries(12)
    current = RankingParams("rrf", 60, 0.5)
    chosen, scored = calibration.choose(queries, _mrr, current=current)
    assert chosen != current and chosen.fusion in ("weighted", "zscore")
    assert calibration.score(chosen, queries, _mrr) == 1.0 > calibration.score(current, queries, _mrr)
    assert scored[0][1] == 1.0 and len(scored) == len(calibration.fusion_grid())
    # When nothing beats the current setting by min_gain, it stays.
    same, _ = calibration.choose(queries, _mrr, current=chosen, min_gain=0.01)
    assert same == chosen


def test_mmr_settings_are_scored_on_top_of_the_best_fusion():
    queries = _queries(4)
    for q in queries:
        ids = {i for i, _ in q.dense} | {i for i, _ in q.bm25}
        q.vectors = {i: np.eye(32, dtype=np.float32)[i % 32] for i in ids}
        q.query_vec = np.eye(32, dtype=np.float32)[0]
    chosen, scored = calibration.choose(queries, _mrr, current=RankingParams(), try_mmr=True)
    assert any("mmr" in params.label() for params, _ in scored)
    ranked = calibration.rank(RankingParams("zscore", 60, 0.3, 0.7), queries[0])
    assert sorted(i for i, _ in ranked) == sorted({i for i, _ in queries[0].dense} | {i for i, _ in queries[0].bm25})


def test_cross_validation_scores_choices_on_held_out_queries():
    queries = _queries(10)
    cv = calibration.cross_validate(queries, _mrr, current=RankingParams(), folds=2)
    assert cv["folds"] == 2 and len(cv["chosen"]) == 2
    assert cv["held_out"] == 1.0 and cv["current_held_out"] < 1.0
