"""What the dense encoder reads, side by side: the chunk alone, or its title and heading path first.

BM25 already indexes "context + text" (benchmarks/chunking_variants.py measured it); this measures the
same choice for the embeddings, dense alone and fused with that BM25 (RRF k=60, as a fresh base does),
on labelled question sets (rag/evaluation.py's hit rule).

Usage: .venv/bin/python -W ignore benchmarks/dense_context_variants.py --model all-minilm-l6-v2 \
           --questions benchmarks/devsets/en.jsonl --documents var/devsets/en [--questions ... --documents ...]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from apps.knowledge.rag.analyzer import get_analyzer  # noqa: E402
from apps.knowledge.rag.chunker import chunk_document  # noqa: E402
from apps.knowledge.rag.errors import IngestError  # noqa: E402
from apps.knowledge.rag.evaluation import first_hit_rank, hit_metrics, load_questions  # noqa: E402
from apps.knowledge.rag.parsers import parse  # noqa: E402
from benchmarks.chunking_variants import _bm25, _scores  # noqa: E402


def encoder_for(key: str):
    """The catalog model `key` on its default backend (the catalog lives in Django settings)."""
    import os

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kotaemon_site.settings")
    os.environ.setdefault("KOTAEMON_DEMO", "1")
    import django

    django.setup()
    from apps.knowledge.embeddings import embedder  # noqa: PLC0415

    return embedder(key)


def chunked_folder(folder, count_tokens, chunk_tokens: int, overlap_tokens: int):
    """(source name, document title, ChunkSpec) for every parseable file under ``folder``, as a base
    chunks it (structure-aware, sized in ``count_tokens``)."""
    out = []
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        try:
            doc = parse(path.read_bytes(), filename=path.name)
        except IngestError:
            continue
        for chunk in chunk_document(doc, count_tokens=count_tokens, chunk_tokens=chunk_tokens,
                                    overlap_tokens=overlap_tokens, structure=True):
            out.append((str(path.relative_to(folder)), doc.title, chunk))
    return out


def rrf(*rankings: list[int], k: int = 60) -> list[int]:
    score: dict[int, float] = {}
    for ranking in rankings:
        for rank, i in enumerate(ranking):
            score[i] = score.get(i, 0.0) + 1.0 / (k + rank + 1)
    return sorted(score, key=lambda i: -score[i])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--questions", action="append", required=True)
    parser.add_argument("--documents", action="append", required=True)
    parser.add_argument("--chunk-tokens", type=int, default=200)
    parser.add_argument("--chunk-overlap", type=int, default=40)
    args = parser.parse_args()
    encoder = encoder_for(args.model)
    tokenize = get_analyzer().tokenize
    for questions_path, folder in zip(args.questions, args.documents):
        questions = load_questions(questions_path)
        rows = [(source, title, chunk.text, chunk.context, [part for part in chunk.heading_path if part])
                for source, title, chunk in chunked_folder(folder, encoder.count_tokens, args.chunk_tokens,
                                                           args.chunk_overlap)]
        print(f"## {questions_path}: {len(questions)} questions, {len(rows)} chunks, model {args.model}")
        bm25 = _bm25([f"{r[3]}\n{r[2]}" for r in rows], tokenize)
        queries = encoder.encode_queries([q.question for q in questions])
        bm25_rank = []
        for question in questions:
            scores = _scores(bm25, question.question, tokenize)
            bm25_rank.append([int(i) for i in np.argsort(-scores, kind="stable")[:100] if scores[i] > 0])
        heading_only = [c.split("\n", 1)[0] for c in (r[3] for r in rows)]
        nearest = [(r[4][-1] if r[4] else r[1] or "") for r in rows]
        variants = {"text": [r[2] for r in rows],
                    "nearest heading + text": [f"{h}\n{r[2]}" if h and not r[2].startswith(h) else r[2]
                                               for h, r in zip(nearest, rows)],
                    "heading path + text": [f"{h}\n{r[2]}" if h else r[2] for h, r in zip(heading_only, rows)],
                    "context + text": [f"{r[3]}\n{r[2]}" if r[3] else r[2] for r in rows]}
        for name, texts in variants.items():
            started = time.process_time()
            vectors = encoder.encode_passages(texts)
            encode_s = time.process_time() - started
            dense_rank = [list(np.argsort(-(vectors @ q), kind="stable")[:100]) for q in queries]
            for mode, ranking in (("dense", dense_rank),
                                  ("hybrid", [rrf(d, b) for d, b in zip(dense_rank, bm25_rank)])):
                ranks = [first_hit_rank(q, [(rows[i][0], rows[i][1], rows[i][2]) for i in r[:10]])
                         for q, r in zip(questions, ranking)]
                m = hit_metrics(ranks)
                print(f"{name:22s} {mode:7s} hit@1 {m['hit@1']:.3f}  hit@3 {m['hit@3']:.3f}  hit@10 {m['hit@10']:.3f}"
                      f"  MRR@10 {m['mrr@10']:.3f}  doc hit@3 {m['doc_hit@3']:.3f}  (encode CPU {encode_s:.0f} s)")


if __name__ == "__main__":
    main()
