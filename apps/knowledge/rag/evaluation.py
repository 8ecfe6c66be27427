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
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from dataclasses import dataclass
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


# ------------------------------------------------------------------------------------------
# Labelled question sets (question, expected document, expected passage)
# ------------------------------------------------------------------------------------------
#
# A retrieved chunk is a *hit* for a question when both hold:
#   1. it belongs to the expected document (see `document_matches`), and
#   2. it contains most of the expected passage: at least PASSAGE_COVERAGE (half) of the passage's
#      distinct token bigrams occur in the chunk (`passage_coverage`).
# Tokens are compared after NFKC normalisation and case folding: each CJK character (Han, kana,
# Hangul) is one token, any other run of letters and digits is one token; punctuation, whitespace and
# markup symbols are ignored, so a passage copied from the page matches the parsed text however the
# parser spaced or punctuated it. Bigrams rather than single tokens keep a chunk that merely shares
# common words with the passage from counting. A one-token passage needs that token.
# The rank of a question is the 1-based position of its first hit; hit@k = rank <= k; MRR@10 = 1/rank
# for rank <= 10, else 0. "doc hit@k" counts condition 1 alone (right document, any section).

PASSAGE_COVERAGE = 0.5
HIT_K = (1, 3, 5, 10)
MRR_DEPTH = 10

_TOKEN_RE = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\U00020000-\U0002fa1f]"
    r"|[^\W_\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]+"
)


@dataclass(frozen=True)
class LabelledQuestion:
    id: str
    question: str
    document: str
    passage: str
    lang: str = ""
    tags: tuple[str, ...] = ()


def load_questions(path: str | Path) -> list[LabelledQuestion]:
    """Read a JSONL question set: one object per line with ``question``, ``document`` and ``passage``
    (required, non-empty strings) and optional ``id``, ``lang`` and ``tags`` (a list of strings).

    Raises ``ValueError`` naming the line for anything malformed; ids must be unique.
    """
    questions: list[LabelledQuestion] = []
    seen: set[str] = set()
    with Path(path).open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {number}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"line {number}: expected a JSON object")
            for key in ("question", "document", "passage"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ValueError(f"line {number}: {key!r} must be a non-empty string")
            tags = row.get("tags") or []
            if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
                raise ValueError(f"line {number}: 'tags' must be a list of strings")
            qid = str(row.get("id") or number)
            if qid in seen:
                raise ValueError(f"line {number}: duplicate id {qid!r}")
            seen.add(qid)
            if not match_tokens(row["passage"]):
                raise ValueError(f"line {number}: the passage has no words")
            questions.append(LabelledQuestion(qid, row["question"].strip(), row["document"].strip(),
                                              row["passage"].strip(), str(row.get("lang") or ""), tuple(tags)))
    if not questions:
        raise ValueError("no questions")
    return questions


def match_tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).casefold())


def _shingles(tokens: Sequence[str]) -> set[tuple[str, ...]]:
    if len(tokens) < 2:
        return {tuple(tokens)} if tokens else set()
    return {(a, b) for a, b in zip(tokens, tokens[1:])}


def passage_coverage(passage: str, chunk_text: str) -> float:
    """Share of the passage's distinct token bigrams that occur in the chunk (0.0 to 1.0)."""
    wanted = _shingles(match_tokens(passage))
    if not wanted:
        return 0.0
    have = _shingles(match_tokens(chunk_text))
    return len(wanted & have) / len(wanted)


def document_matches(expected: str, source_name: str, title: str = "") -> bool:
    """The expected document names this one: equal names, or one is a trailing path of the other
    (``postgresql/sql-vacuum.html`` and an upload named ``sql-vacuum.html``), or the title equals it."""
    expected, source_name = expected.strip().strip("/"), source_name.strip().strip("/")
    if not expected:
        return False
    if expected == source_name or (title and expected == title.strip()):
        return True
    return source_name.endswith("/" + expected) or expected.endswith("/" + source_name)


def first_hit_rank(question: LabelledQuestion, ranked: Sequence[tuple[str, str, str]]
                   ) -> tuple[int | None, int | None]:
    """(rank of the first hit, rank of the first chunk of the right document), 1-based or None.

    ``ranked`` is ``[(document source name, document title, chunk text), ...]`` best first.
    """
    hit = doc = None
    for rank, (source_name, title, text) in enumerate(ranked, start=1):
        if document_matches(question.document, source_name, title):
            doc = doc or rank
            if passage_coverage(question.passage, text) >= PASSAGE_COVERAGE:
                hit = rank
                break
    return hit, doc


def hit_metrics(ranks: Sequence[tuple[int | None, int | None]]) -> dict[str, float]:
    """hit@1/3/5/10, MRR@10, doc hit@3 and doc MRR@10 over (hit rank, document rank) pairs."""
    count = max(len(ranks), 1)
    result: dict[str, float] = {}
    for k in HIT_K:
        result[f"hit@{k}"] = sum(1 for hit, _ in ranks if hit is not None and hit <= k) / count
    result["mrr@10"] = sum(1.0 / hit for hit, _ in ranks if hit is not None and hit <= MRR_DEPTH) / count
    result["doc_hit@3"] = sum(1 for _, doc in ranks if doc is not None and doc <= 3) / count
    result["doc_mrr@10"] = sum(1.0 / doc for _, doc in ranks if doc is not None and doc <= MRR_DEPTH) / count
    result["queries"] = float(len(ranks))
    return result


def question_subsets(questions: Sequence[LabelledQuestion]) -> dict[str, list[int]]:
    """Indices of the questions per subset: ``lang:<lang>`` and ``tag:<tag>`` (only subsets that exist)."""
    subsets: dict[str, list[int]] = {}
    for index, question in enumerate(questions):
        keys = ([f"lang:{question.lang}"] if question.lang else []) + [f"tag:{tag}" for tag in question.tags]
        for key in keys:
            subsets.setdefault(key, []).append(index)
    return dict(sorted(subsets.items()))
