"""Combining ranked lists (RRF, convex score fusion) and diversifying them (MMR).

Every result list is ``[(id, score), ...]`` best first, as returned by the indexes. Ties in a fused
score are broken by the best rank the id had in any input list, then by id, so output is
deterministic.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Ranked = list[tuple[int, float]]


def rrf(result_lists: Sequence[Sequence[tuple[int, float]]], k: int = 60, weights: Sequence[float] | None = None) -> Ranked:
    """Reciprocal rank fusion: ``score(d) = sum_i w_i / (k + rank_i(d))`` with 1-based ranks.

    Only ranks matter, so lists with incomparable scores (cosine vs BM25) fuse safely.
    """
    weights = _weights(result_lists, weights)
    scores: dict[int, float] = {}
    best_rank: dict[int, int] = {}
    for weight, results in zip(weights, result_lists):
        for rank, (doc_id, _) in enumerate(results, start=1):
            scores[doc_id] = scores.get(doc_id, 0.0) + weight / (k + rank)
            best_rank[doc_id] = min(best_rank.get(doc_id, rank), rank)
    return _sorted(scores, best_rank)


def weighted_fusion(result_lists: Sequence[Sequence[tuple[int, float]]], weights: Sequence[float] | None = None) -> Ranked:
    """Convex combination of per-list min-max normalised scores (missing from a list = 0).

    Weights are non-negative and rescaled to sum to 1. A list whose scores are all equal
    normalises to 1.0 for each of its members.
    """
    weights = _weights(result_lists, weights)
    total = sum(weights)
    if total <= 0:
        raise ValueError("at least one weight must be positive")
    scores: dict[int, float] = {}
    best_rank: dict[int, int] = {}
    for weight, results in zip(weights, result_lists):
        for rank, (doc_id, normalised) in enumerate(_min_max(results), start=1):
            scores[doc_id] = scores.get(doc_id, 0.0) + (weight / total) * normalised
            best_rank[doc_id] = min(best_rank.get(doc_id, rank), rank)
    return _sorted(scores, best_rank)


def _weights(result_lists: Sequence[Sequence[tuple[int, float]]], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(result_lists)
    if len(weights) != len(result_lists):
        raise ValueError(f"{len(weights)} weights for {len(result_lists)} result lists")
    if any(w < 0 for w in weights):
        raise ValueError("weights must be non-negative")
    return [float(w) for w in weights]


def _min_max(results: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    if not results:
        return []
    values = [score for _, score in results]
    low, high = min(values), max(values)
    if high == low:
        return [(doc_id, 1.0) for doc_id, _ in results]
    return [(doc_id, (score - low) / (high - low)) for doc_id, score in results]


def _sorted(scores: dict[int, float], best_rank: dict[int, int]) -> Ranked:
    ordered = sorted(scores, key=lambda doc_id: (-scores[doc_id], best_rank[doc_id], doc_id))
    return [(doc_id, scores[doc_id]) for doc_id in ordered]


def mmr(
    candidate_ids: Sequence[int],
    candidate_vectors: np.ndarray,
    query_vec: np.ndarray,
    lambda_: float = 0.7,
    top_k: int = 10,
) -> Ranked:
    """Maximal marginal relevance selection over L2-normalised vectors.

    Picks, one at a time, the candidate maximising
    ``lambda_ * sim(query, c) - (1 - lambda_) * max(sim(c, selected))``; returns
    ``[(id, mmr_score_at_selection)]`` in selection order. ``lambda_=1`` is plain relevance order.
    """
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError("lambda_ must be within [0, 1]")
    vectors = np.asarray(candidate_vectors, dtype=np.float32)
    if len(candidate_ids) != len(vectors):
        raise ValueError(f"{len(candidate_ids)} ids for {len(vectors)} vectors")
    if len(candidate_ids) == 0 or top_k <= 0:
        return []
    relevance = vectors @ np.asarray(query_vec, dtype=np.float32).reshape(-1)
    redundancy = np.full(len(vectors), -np.inf, dtype=np.float32)
    available = np.ones(len(vectors), dtype=bool)
    selected: Ranked = []
    for _ in range(min(top_k, len(vectors))):
        penalty = np.where(np.isfinite(redundancy), redundancy, 0.0)
        scores = np.where(available, lambda_ * relevance - (1.0 - lambda_) * penalty, -np.inf)
        choice = int(np.argmax(scores))
        selected.append((int(candidate_ids[choice]), float(scores[choice])))
        available[choice] = False
        redundancy = np.maximum(redundancy, vectors @ vectors[choice])
    return selected
