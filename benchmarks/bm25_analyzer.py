"""BM25 tokenization on SciFact: the English-only tokenizer before the analyzer vs rag/analyzer.py.

Document-level BM25 (title + blank line + text, no chunking), same bm25s parameters as the index,
so the only difference is tokenization. Prints nDCG@10, Recall@100, MRR@10 per tokenizer and the
CPU time to tokenize the corpus.

Usage: .venv/bin/python benchmarks/bm25_analyzer.py [--dataset ../shared/datasets/scifact] [--split test]
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from apps.knowledge.rag.analyzer import get_analyzer  # noqa: E402
from apps.knowledge.rag.evaluation import evaluate_run, load_beir  # noqa: E402

_LEGACY = re.compile(r"(?u)\b\w\w+\b")


def legacy_tokenizer():
    import Stemmer
    from bm25s.stopwords import STOPWORDS_EN

    stop, stemmer = frozenset(STOPWORDS_EN), Stemmer.Stemmer("english")

    def tokenize(text: str) -> list[str]:
        return stemmer.stemWords([w for w in _LEGACY.findall(text.lower()) if w not in stop])
    return tokenize


def run(name, tokenize, doc_ids, texts, queries, qrels):
    import bm25s

    started = time.process_time()
    corpus = [tokenize(t) for t in texts]
    tokenize_s = time.process_time() - started
    model = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    model.index(corpus, show_progress=False)
    vocab = model.vocab_dict
    results = {}
    for qid, query in queries.items():
        ids = [vocab[t] for t in tokenize(query) if t in vocab]
        if not ids:
            results[qid] = []
            continue
        scores = np.asarray(model.get_scores_from_ids(ids))
        top = np.argsort(-scores, kind="stable")[:100]
        results[qid] = [doc_ids[i] for i in top if scores[i] > 0]
    metrics = evaluate_run(results, qrels)
    print(f"{name:10s} nDCG@10 {metrics['ndcg@10']:.4f}  Recall@100 {metrics['recall@100']:.4f}  "
          f"MRR@10 {metrics['mrr@10']:.4f}  corpus tokenize CPU {tokenize_s:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="../shared/datasets/scifact")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    corpus, queries, qrels = load_beir(args.dataset, args.split)
    doc_ids = list(corpus)
    texts = [f"{corpus[d]['title']}\n\n{corpus[d]['text']}" for d in doc_ids]
    print(f"{len(texts)} documents, {len(queries)} queries ({args.split})")
    run("legacy", legacy_tokenizer(), doc_ids, texts, queries, qrels)
    run("analyzer", get_analyzer().tokenize, doc_ids, texts, queries, qrels)


if __name__ == "__main__":
    main()
