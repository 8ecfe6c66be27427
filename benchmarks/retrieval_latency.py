"""Retrieval latency of the RAG core: dense, BM25 and hybrid (encode + both searches + RRF).

Chunks are synthesised by sampling 2-6 sentences from the SciFact corpus, so BM25 sees a real
vocabulary and realistic posting lists. Dense index vectors are random unit vectors (encoding 100k
chunks would take hours on 2 cores; flat search cost does not depend on the values, HNSW on random
vectors is close to its worst case); the QUERY is encoded with the real model on every query, so
the encode cost in the dense and hybrid columns is real. Queries are the SciFact test claims.

    .venv/bin/python benchmarks/retrieval_latency.py --sizes 10000 100000 --threads 1
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.knowledge.rag.embedder import configure_threads, get_embedder  # noqa: E402
from apps.knowledge.rag.evaluation import load_beir  # noqa: E402
from apps.knowledge.rag.fusion import rrf  # noqa: E402
from apps.knowledge.rag.index import BM25Index, DenseIndex  # noqa: E402

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "scifact"
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="BEIR SciFact directory")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="index sizes in chunks")
    parser.add_argument("--queries", type=int, default=300, help="timed queries per size (SciFact test claims, cycled)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed queries before timing")
    parser.add_argument("--k", type=int, default=10, help="results returned")
    parser.add_argument("--candidates", type=int, default=100, help="top-k taken from each index before fusion")
    parser.add_argument("--threads", type=int, default=1, help="torch/FAISS/BLAS threads (web processes use 1)")
    parser.add_argument("--hnsw-threshold", type=int, default=50_000, help="HNSW at or above this many chunks")
    parser.add_argument("--ef-search", type=int, default=64)
    parser.add_argument("--also-flat", action="store_true", help="also time exact flat search where HNSW is used")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def sentences_from(corpus: dict[str, dict[str, str]]) -> list[str]:
    sentences = []
    for doc in corpus.values():
        sentences.extend(s for s in _SENTENCE.split(doc["text"]) if len(s) > 20)
    return sentences


def synthesize_chunks(sentences: list[str], n: int, rng: np.random.Generator) -> list[str]:
    lengths = rng.integers(2, 7, size=n)
    picks = rng.integers(0, len(sentences), size=int(lengths.sum()))
    chunks, cursor = [], 0
    for length in lengths:
        chunks.append(" ".join(sentences[i] for i in picks[cursor : cursor + length]))
        cursor += length
    return chunks


def random_unit_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def percentiles(samples: list[float]) -> str:
    values = np.asarray(samples) * 1000
    return f"{np.percentile(values, 50):.2f} / {np.percentile(values, 95):.2f}"


def time_queries(embedder, dense: DenseIndex, bm25: BM25Index, queries: list[str], args) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {"encode": [], "dense_search": [], "bm25": [], "fuse": []}
    for number, query in enumerate(queries[: args.warmup] + queries):
        t0 = time.perf_counter()
        query_vec = embedder.encode_query(query)
        t1 = time.perf_counter()
        dense_hits = dense.search(query_vec, args.candidates)
        t2 = time.perf_counter()
        bm25_hits = bm25.search(query, args.candidates)
        t3 = time.perf_counter()
        rrf([dense_hits, bm25_hits])[: args.k]
        t4 = time.perf_counter()
        if number >= args.warmup:
            for key, value in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                timings[key].append(value)
    return timings


def hnsw_recall(hnsw: DenseIndex, flat: DenseIndex, query_vecs: np.ndarray, k: int) -> float:
    hits = 0
    for query in query_vecs:
        hits += len({i for i, _ in hnsw.search(query, k)} & {i for i, _ in flat.search(query, k)})
    return hits / (len(query_vecs) * k)


def main() -> None:
    args = parse_args()
    threads = configure_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    corpus, test_queries, _ = load_beir(args.dataset, "test")
    sentences = sentences_from(corpus)
    queries = [test_queries[q] for q in sorted(test_queries, key=int)]
    queries = (queries * (args.queries // len(queries) + 1))[: args.queries]
    embedder = get_embedder()
    embedder.warm_up()

    rows, notes = [], []
    for size in args.sizes:
        texts = synthesize_chunks(sentences, size, rng)
        vectors = random_unit_vectors(size, embedder.dim, rng)
        ids = np.arange(size, dtype=np.int64)
        started = time.perf_counter()
        bm25 = BM25Index(ids, texts)
        bm25_build = time.perf_counter() - started
        kinds = ["auto"] + (["flat"] if args.also_flat and size >= args.hnsw_threshold else [])
        flat_for_recall = None
        for kind in kinds:
            threshold = args.hnsw_threshold if kind == "auto" else size + 1
            started = time.perf_counter()
            dense = DenseIndex(ids, vectors, hnsw_threshold=threshold, ef_search=args.ef_search)
            dense_build = time.perf_counter() - started
            timings = time_queries(embedder, dense, bm25, queries, args)
            dense_total = [e + s for e, s in zip(timings["encode"], timings["dense_search"])]
            hybrid = [sum(parts) for parts in zip(*timings.values())]
            rows.append(
                f"| {size:,} | {dense.kind} | {dense_build:.1f} / {bm25_build:.1f} | {percentiles(timings['encode'])} "
                f"| {percentiles(timings['dense_search'])} | {percentiles(dense_total)} "
                f"| {percentiles(timings['bm25'])} | {percentiles(timings['fuse'])} | {percentiles(hybrid)} |"
            )
            if dense.kind == "hnsw":
                hnsw_index = dense
            else:
                flat_for_recall = dense
        if args.also_flat and flat_for_recall is not None and size >= args.hnsw_threshold:
            query_vecs = embedder.encode(queries[:100])
            noise = random_unit_vectors(100, embedder.dim, rng)
            notes.append(
                f"- {size:,} chunks: HNSW recall@{args.k} vs exact on these RANDOM index vectors = "
                f"{hnsw_recall(hnsw_index, flat_for_recall, query_vecs, args.k):.3f} (model query vectors), "
                f"{hnsw_recall(hnsw_index, flat_for_recall, noise, args.k):.3f} (random queries). Isotropic random "
                "vectors have no neighbourhood structure, the worst case for HNSW; on real embeddings recall is "
                "far higher (see apps/knowledge/rag/index.py)."
            )

    print(f"\nRetrieval latency, ms (p50 / p95), {args.queries} queries after {args.warmup} warm-up; "
          f"{threads} thread(s); candidates={args.candidates}, k={args.k}, efSearch={args.ef_search}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| chunks | dense index | build s (dense / bm25) | query encode | dense search | dense total "
          "| bm25 | rrf | hybrid total |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    print("\n- dense total = real query encode + FAISS search; hybrid total = encode + dense top-"
          f"{args.candidates} + BM25 top-{args.candidates} + RRF.")
    print("- Index vectors are random unit vectors (not model embeddings); chunk texts for BM25 are "
          "2-6 sentences sampled from SciFact; queries are SciFact test claims.")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
