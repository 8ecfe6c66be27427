"""BM25 tokenization: the English-only tokenizer before the analyzer, the analyzer with bm25s' English
stopwords only (version 2), and rag/analyzer.py as it is.

SciFact: document-level BM25 (title + blank line + text, no chunking), same bm25s parameters as the
index, so the only difference is tokenization; nDCG@10, Recall@100, MRR@10 per tokenizer and the CPU
time to tokenize the corpus. With ``--questions Q --documents D`` (repeatable pairs, the development
sets): BM25 alone over the chunks a base makes of D (structure-aware, 200/40 tokens of the set's model),
hit@3 / MRR@10 with rag/evaluation.py's hit rule.

Usage: .venv/bin/python benchmarks/bm25_analyzer.py [--dataset ../shared/datasets/scifact] [--split test] \
           [--questions benchmarks/devsets/en.jsonl --documents var/devsets/en ...]
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


def version2_tokenizer():
    """The analyzer with bm25s' English stopwords only (before the question words joined them)."""
    from bm25s.stopwords import STOPWORDS_EN

    from apps.knowledge.rag.analyzer import Analyzer

    analyzer = Analyzer()
    analyzer._english_stopwords = frozenset(STOPWORDS_EN)
    return analyzer.tokenize


def run_devset(tokenizers: dict, questions_path, documents) -> None:
    """BM25 alone over the set's chunks (chunked once), hit@3 / MRR@10 per tokenizer."""
    from apps.knowledge.rag.chunker import indexed_text
    from apps.knowledge.rag.evaluation import first_hit_rank, hit_metrics, load_questions
    from benchmarks.chunking_variants import _bm25, _scores
    from benchmarks.dense_context_variants import chunked_folder, encoder_for

    questions = load_questions(questions_path)
    cjk = any(q.lang == "zh" for q in questions)
    count = encoder_for("multilingual-e5-small" if cjk else "all-minilm-l6-v2").count_tokens
    rows = [(source, title, chunk.text, indexed_text(chunk.text, chunk.context))
            for source, title, chunk in chunked_folder(documents, count, 200, 40)]
    for name, tokenize in tokenizers.items():
        model = _bm25([r[3] for r in rows], tokenize)
        ranks = []
        for question in questions:
            scores = _scores(model, question.question, tokenize)
            order = [int(i) for i in np.argsort(-scores, kind="stable")[:10] if scores[i] > 0]
            ranks.append(first_hit_rank(question, [(rows[i][0], rows[i][1], rows[i][2]) for i in order]))
        m = hit_metrics(ranks)
        print(f"{Path(questions_path).stem:6s} {name:10s} hit@3 {m['hit@3']:.3f}  MRR@10 {m['mrr@10']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="../shared/datasets/scifact")
    parser.add_argument("--split", default="test")
    parser.add_argument("--questions", action="append", default=[])
    parser.add_argument("--documents", action="append", default=[])
    args = parser.parse_args()
    tokenizers = {"legacy": legacy_tokenizer(), "version 2": version2_tokenizer(), "analyzer": get_analyzer().tokenize}
    for questions, documents in zip(args.questions, args.documents):
        run_devset({name: tokenizers[name] for name in ("version 2", "analyzer")}, questions, documents)
    corpus, queries, qrels = load_beir(args.dataset, args.split)
    doc_ids = list(corpus)
    texts = [f"{corpus[d]['title']}\n\n{corpus[d]['text']}" for d in doc_ids]
    print(f"{len(texts)} documents, {len(queries)} queries ({args.split})")
    for name, tokenize in tokenizers.items():
        run(name, tokenize, doc_ids, texts, queries, qrels)


if __name__ == "__main__":
    main()
