"""BEIR-format dataset loading and retrieval metrics (pytrec_eval / BEIR definitions).

Metric conventions, matching ``trec_eval`` as used by BEIR and MTEB:

- nDCG@k uses linear gain ``rel / log2(rank + 1)`` and the ideal ranking of all judged-relevant
  documents (``rel > 0``) truncated at k;
- Recall@k = |relevant in top k| / |relevant|;
- MRR@k = 1 / rank of the first relevant document within the top k, else 0;
- a query with no relevant document scores 0 on every metric and is still averaged in; a query
  with no run entry scores 0.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO

Qrels = dict[str, dict[str, int]]


def load_beir(
    path: str | Path, split: str = "test"
) -> tuple[dict[str, dict[str, str]], dict[str, str], Qrels]:
    """Load ``corpus.jsonl[.gz]``, ``queries.jsonl`` and ``qrels/<split>.tsv`` from ``path``.

    Queries keep only their ``text`` (BEIR's ``metadata`` can hold the answers) and are restricted to
    those judged in the split, as BEIR's loader does. The qrels header and CRLF endings are handled.
    """
    root = Path(path)
    qrels = _load_qrels(root / "qrels" / f"{split}.tsv")
    corpus = {
        str(row["_id"]): {"title": row.get("title") or "", "text": row.get("text") or ""}
        for row in _read_jsonl(_corpus_path(root))
    }
    queries = {
        str(row["_id"]): row.get("text") or ""
        for row in _read_jsonl(root / "queries.jsonl")
        if str(row["_id"]) in qrels
    }
    return corpus, queries, qrels


def _corpus_path(root: Path) -> Path:
    for name in ("corpus.jsonl", "corpus.jsonl.gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"no corpus.jsonl[.gz] in {root}")


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _read_jsonl(path: Path) -> Iterable[dict]:
    with _open_text(path) as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def _load_qrels(path: Path) -> Qrels:
    qrels: Qrels = {}
    with path.open("r", encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        for row in reader:
            row = [cell.strip() for cell in row]
            if len(row) < 3 or row[0] == "query-id":
                continue
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    return qrels


def dcg(gains: Sequence[float]) -> float:
    return sum(gain / math.log2(rank + 2) for rank, gain in enumerate(gains))


def ndcg_at_k(ranked: Sequence[str], relevance: Mapping[str, int], k: int) -> float:
    ideal = sorted((rel for rel in relevance.values() if rel > 0), reverse=True)[:k]
    if not ideal:
        return 0.0
    gains = [max(relevance.get(doc_id, 0), 0) for doc_id in _dedupe(ranked)[:k]]
    return dcg(gains) / dcg(ideal)


def recall_at_k(ranked: Sequence[str], relevance: Mapping[str, int], k: int) -> float:
    relevant = {doc_id for doc_id, rel in relevance.items() if rel > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(_dedupe(ranked)[:k])) / len(relevant)


def mrr_at_k(ranked: Sequence[str], relevance: Mapping[str, int], k: int) -> float:
    for rank, doc_id in enumerate(_dedupe(ranked)[:k], start=1):
        if relevance.get(doc_id, 0) > 0:
            return 1.0 / rank
    return 0.0


def _dedupe(ranked: Sequence[str]) -> list[str]:
    """A run lists each document once; later duplicates (e.g. several chunks of one doc) are dropped."""
    seen: set[str] = set()
    unique = []
    for doc_id in ranked:
        if doc_id not in seen:
            seen.add(doc_id)
            unique.append(doc_id)
    return unique


def evaluate_run(
    run: Mapping[str, Sequence[str]],
    qrels: Qrels,
    *,
    ndcg_k: Sequence[int] = (10,),
    recall_k: Sequence[int] = (10, 100),
    mrr_k: Sequence[int] = (10,),
) -> dict[str, float]:
    """Mean metrics over every query in ``qrels``: ``{"ndcg@10": ..., "recall@100": ..., ...}``."""
    metrics = [("ndcg", k, ndcg_at_k) for k in ndcg_k]
    metrics += [("recall", k, recall_at_k) for k in recall_k]
    metrics += [("mrr", k, mrr_at_k) for k in mrr_k]
    totals = {f"{name}@{k}": 0.0 for name, k, _ in metrics}
    for query_id, relevance in qrels.items():
        ranked = [str(doc_id) for doc_id in run.get(query_id, [])]
        for name, k, metric in metrics:
            totals[f"{name}@{k}"] += metric(ranked, relevance, k)
    count = max(len(qrels), 1)
    result = {key: value / count for key, value in totals.items()}
    result["queries"] = float(len(qrels))
    return result
