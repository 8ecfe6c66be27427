"""Chunking and index-text variants, side by side, by BM25 on labelled question sets (no encoding).

For every document under ``--documents`` (parsed by rag.parsers, chunked by rag.chunker with the
bundled model's tokenizer) and every question of ``--questions`` (see rag/evaluation.py for what a
hit is), BM25 (rag/analyzer.py) ranks the chunks under each variant:

- tokenizer: rag/analyzer.py, or (``text-legacy-tokenizer``) the English-only tokenizer before it;
- chunking: ``plain`` (packing only) or ``structure`` (numbered clauses / list items kept whole);
- index text: ``text`` (the chunk), ``prefix`` (title + heading path + abbreviation forms, then the
  chunk, as one field), ``field`` (the chunk and the context as two BM25 indexes, scores added with
  the context weighted ``--field-weight``), ``prefix-noabbr`` (title + heading path only).

Usage: .venv/bin/python benchmarks/chunking_variants.py --questions benchmarks/devsets/en.jsonl \
           --documents var/devsets/en [--questions ... --documents ...]
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
from apps.knowledge.rag.embedder import Embedder, default_model_path  # noqa: E402
from apps.knowledge.rag.errors import IngestError  # noqa: E402
from apps.knowledge.rag.evaluation import first_hit_rank, hit_metrics, load_questions  # noqa: E402
from apps.knowledge.rag.parsers import parse  # noqa: E402
from benchmarks.bm25_analyzer import legacy_tokenizer  # noqa: E402


def _bm25(texts, tokenize):
    import bm25s

    model = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    model.index([tokenize(t) for t in texts], show_progress=False)
    return model


def _scores(model, query, tokenize):
    vocab = model.vocab_dict
    ids = [vocab[t] for t in tokenize(query) if t in vocab]
    if not ids:
        return np.zeros(model.scores["num_docs"], dtype=np.float32)
    return np.asarray(model.get_scores_from_ids(ids))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", action="append", required=True)
    parser.add_argument("--documents", action="append", required=True)
    parser.add_argument("--chunk-tokens", type=int, default=200)
    parser.add_argument("--chunk-overlap", type=int, default=40)
    parser.add_argument("--field-weight", type=float, default=0.5)
    args = parser.parse_args()
    count_tokens = Embedder(default_model_path()).count_tokens
    for questions_path, folder in zip(args.questions, args.documents):
        questions = load_questions(questions_path)
        docs = []
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                try:
                    docs.append((str(path.relative_to(folder)), parse(path.read_bytes(), filename=path.name)))
                except IngestError:
                    pass
        print(f"## {questions_path}: {len(questions)} questions, {len(docs)} documents")
        for structure in (False, True):
            started = time.process_time()
            rows = []  # (source name, title, chunk text, context)
            for name, doc in docs:
                for chunk in chunk_document(doc, count_tokens=count_tokens, chunk_tokens=args.chunk_tokens,
                                            overlap_tokens=args.chunk_overlap, structure=structure):
                    rows.append((name, doc.title, chunk.text, chunk.context))
            chunk_s = time.process_time() - started
            contexts = [r[3] for r in rows]
            no_abbr = [c.split("\n", 1)[0] for c in contexts]
            variants = {"text": ([r[2] for r in rows], None)}
            if not structure:
                variants["text-legacy-tokenizer"] = ([r[2] for r in rows], None)
            if structure:
                variants["prefix-noabbr"] = ([f"{c}\n{r[2]}" for c, r in zip(no_abbr, rows)], None)
                variants["prefix"] = ([f"{c}\n{r[2]}" for c, r in zip(contexts, rows)], None)
                variants["field"] = ([r[2] for r in rows], contexts)
            for variant, (texts, field) in variants.items():
                tokenize = legacy_tokenizer() if "legacy" in variant else get_analyzer().tokenize
                model = _bm25(texts, tokenize)
                field_model = _bm25(field, tokenize) if field else None
                ranks = []
                for question in questions:
                    scores = _scores(model, question.question, tokenize)
                    if field_model is not None:
                        scores = scores + args.field_weight * _scores(field_model, question.question, tokenize)
                    top = np.argsort(-scores, kind="stable")[:10]
                    ranked = [(rows[i][0], rows[i][1], rows[i][2]) for i in top if scores[i] > 0]
                    ranks.append(first_hit_rank(question, ranked))
                m = hit_metrics(ranks)
                label = f"{'structure' if structure else 'plain'}/{variant}"
                print(f"{label:26s} chunks {len(rows):5d}  hit@1 {m['hit@1']:.3f}  hit@3 {m['hit@3']:.3f}  "
                      f"hit@10 {m['hit@10']:.3f}  MRR@10 {m['mrr@10']:.3f}  doc hit@3 {m['doc_hit@3']:.3f}  "
                      f"(chunking CPU {chunk_s:.1f} s)")


if __name__ == "__main__":
    main()
