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


def weighted_fusion(result_lists: Sequence[Sequence[tuple[int, float]]], weights: Sequence[float] | None = None,
                    normalization: str = "minmax") -> Ranked:
    """Convex combination of per-list normalised scores.

    ``normalization="minmax"``: each list is scaled to [0, 1]; an id missing from a list scores 0 there
    (the list's minimum). A list whose scores are all equal normalises to 1.0 for each of its members.
    ``normalization="zscore"``: each list is standardised ((s - mean) / std); an id missing from a list
    gets that list's lowest standardised score, so absence never beats presence. Weights are
    non-negative and rescaled to sum to 1.
    """
    if normalization not in ("minmax", "zscore"):
        raise ValueError(f"unknown normalization {normalization!r}")
    weights = _weights(result_lists, weights)
    total = sum(weights)
    if total <= 0:
        raise ValueError("at least one weight must be positive")
    normalise = _min_max if normalization == "minmax" else _z_score
    normalised_lists = [normalise(results) for results in result_lists]
    floors = [min((score for _, score in lst), default=0.0) for lst in normalised_lists]
    all_ids = {doc_id for lst in normalised_lists for doc_id, _ in lst}
    scores: dict[int, float] = {}
    best_rank: dict[int, int] = {}
    for weight, normalised, floor in zip(weights, normalised_lists, floors):
        present = dict(normalised)
        if normalization == "zscore":
            for doc_id in all_ids:  # absent ids score the list's floor
                scores[doc_id] = scores.get(doc_id, 0.0) + (weight / total) * present.get(doc_id, floor)
        else:
            for doc_id, value in normalised:
                scores[doc_id] = scores.get(doc_id, 0.0) + (weight / total) * value
        for rank, (doc_id, _) in enumerate(normalised, start=1):
            best_rank[doc_id] = min(best_rank.get(doc_id, rank), rank)
    return _sorted(scores, best_rank)


FUSIONS = ("rrf", "weighted", "zscore")


def fuse(kind: str, dense: Sequence[tuple[int, float]], bm25: Sequence[tuple[int, float]], *, rrf_k: int = 60,
         dense_weight: float = 0.5) -> Ranked:
    """The hybrid ranking of one knowledge base: ``kind`` is ``rrf`` (rank-based, k = ``rrf_k``),
    ``weighted`` (min-max convex combination) or ``zscore`` (z-score convex combination), the last two
    with ``dense_weight`` for the dense list and the rest for BM25. The one place retrieval and
    calibration both fuse, so a calibrated setting means the same thing when it is served."""
    if kind == "rrf":
        return rrf([dense, bm25], k=rrf_k)
    if kind in ("weighted", "zscore"):
        return weighted_fusion([dense, bm25], [dense_weight, 1.0 - dense_weight],
                               normalization="minmax" if kind == "weighted" else "zscore")
    raise ValueError(f"unknown fusion {kind!r}")


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


def _z_score(results: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    if not results:
        return []
    values = np.asarray([score for _, score in results], dtype=np.float64)
    std = float(values.std())
    if std == 0.0:
        return [(doc_id, 0.0) for doc_id, _ in results]
    mean = float(values.mean())
    return [(doc_id, (score - mean) / std) for doc_id, score in results]


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
