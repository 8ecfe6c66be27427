"""Choosing a knowledge base's fusion and ranking settings from labelled training queries.

The dense and BM25 candidate lists of every training query are computed once; each setting of the grid
re-fuses them (cheap) and is scored by the caller's metric (nDCG@10 for a BEIR split, MRR@10 for a
labelled question set). The best setting wins only if it beats the current one by more than `min_gain`,
so noise on a small set does not flip a base's settings back and forth. `cross_validate` reports what a
setting chosen this way scores on queries it was not chosen on (k folds), which is the honest figure
when the only evaluation set is also the calibration set.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .fusion import Ranked, fuse, mmr

RRF_KS = (5, 10, 20, 40, 60, 100)
DENSE_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MMR_LAMBDAS = (None, 0.95, 0.9, 0.8, 0.7)
MMR_POOL = 30


@dataclass(frozen=True)
class RankingParams:
    fusion: str = "rrf"
    rrf_k: int = 60
    dense_weight: float = 0.5
    mmr_lambda: float | None = None

    def label(self) -> str:
        base = f"rrf k={self.rrf_k}" if self.fusion == "rrf" else f"{self.fusion} w={self.dense_weight:.2f}"
        return base if self.mmr_lambda is None else f"{base}, mmr {self.mmr_lambda:.2f}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QueryCandidates:
    """One training query's candidate lists, best first; `vectors` (id -> unit vector) and `query_vec`
    are needed only for MMR settings."""
    dense: Ranked
    bm25: Ranked
    query_vec: np.ndarray | None = None
    vectors: dict[int, np.ndarray] | None = None


def fusion_grid() -> list[RankingParams]:
    grid = [RankingParams("rrf", k, 0.5) for k in RRF_KS]
    grid += [RankingParams(kind, 60, w) for kind in ("weighted", "zscore") for w in DENSE_WEIGHTS]
    return grid


def rank(params: RankingParams, query: QueryCandidates) -> Ranked:
    """The hybrid ranking `params` gives this query, as retrieval would serve it."""
    fused = fuse(params.fusion, query.dense, query.bm25, rrf_k=params.rrf_k, dense_weight=params.dense_weight)
    if params.mmr_lambda is None or query.vectors is None or query.query_vec is None or len(fused) < 2:
        return fused
    pool = [doc_id for doc_id, _ in fused[:MMR_POOL] if doc_id in query.vectors]
    if len(pool) < 2:
        return fused
    chosen = mmr(pool, np.vstack([query.vectors[i] for i in pool]), query.query_vec, lambda_=params.mmr_lambda,
                 top_k=len(pool))
    picked = {doc_id for doc_id, _ in chosen}
    return chosen + [item for item in fused if item[0] not in picked]


Metric = Callable[[int, Ranked], float]  # (query index, ranking) -> score of that query


def score(params: RankingParams, queries: Sequence[QueryCandidates], metric: Metric,
          indices: Sequence[int] | None = None) -> float:
    chosen = range(len(queries)) if indices is None else indices
    values = [metric(i, rank(params, queries[i])) for i in chosen]
    return float(sum(values) / max(len(values), 1))


def search(queries: Sequence[QueryCandidates], metric: Metric, grid: Sequence[RankingParams],
           indices: Sequence[int] | None = None) -> list[tuple[RankingParams, float]]:
    """Every setting of `grid` with its mean score on `indices` (default: all), best first; ties keep
    grid order, so the simpler setting listed first wins."""
    scored = [(params, score(params, queries, metric, indices)) for params in grid]
    return sorted(scored, key=lambda item: -item[1])


def with_mmr(best: RankingParams, lambdas: Sequence[float | None] = MMR_LAMBDAS) -> list[RankingParams]:
    return [RankingParams(best.fusion, best.rrf_k, best.dense_weight, lam) for lam in lambdas]


def choose(queries: Sequence[QueryCandidates], metric: Metric, *, current: RankingParams,
           indices: Sequence[int] | None = None, min_gain: float = 0.0, try_mmr: bool = False
           ) -> tuple[RankingParams, list[tuple[RankingParams, float]]]:
    """The best fusion setting (then, if `try_mmr`, the best MMR lambda on top of it); `current` stays
    unless the winner beats it by more than `min_gain`. Returns (chosen, every scored setting)."""
    scored = search(queries, metric, fusion_grid(), indices)
    best = scored[0][0]
    if try_mmr:
        mmr_scored = search(queries, metric, with_mmr(best), indices)
        scored += [item for item in mmr_scored if item[0].mmr_lambda is not None]
        best = max(mmr_scored, key=lambda item: item[1])[0]
        scored.sort(key=lambda item: -item[1])
    current_score = score(current, queries, metric, indices)
    best_score = score(best, queries, metric, indices)
    return (best if best_score > current_score + min_gain else current), scored


def cross_validate(queries: Sequence[QueryCandidates], metric: Metric, *, current: RankingParams, folds: int = 2,
                   seed: int = 0, min_gain: float = 0.0, try_mmr: bool = False) -> dict:
    """Choose on k-1 folds, score on the held-out fold; mean held-out score of the chosen settings
    against the current setting on the same folds."""
    order = list(range(len(queries)))
    random.Random(seed).shuffle(order)
    parts = [order[i::folds] for i in range(folds)]
    held, base, picks = [], [], []
    for i, test in enumerate(parts):
        train = [q for j, part in enumerate(parts) if j != i for q in part]
        chosen, _ = choose(queries, metric, current=current, indices=train, min_gain=min_gain, try_mmr=try_mmr)
        held.append(score(chosen, queries, metric, test) * len(test))
        base.append(score(current, queries, metric, test) * len(test))
        picks.append(chosen.label())
    n = max(len(queries), 1)
    return {"folds": folds, "held_out": sum(held) / n, "current_held_out": sum(base) / n, "chosen": picks}
