"""Which precision where: all-MiniLM-L6-v2 passages and queries on PyTorch, ONNX float and ONNX int8, mixed.

1. Speed, side by side in one run: ingestion tokens/s CPU (``--speed-docs`` SciFact abstracts) and query
   encode p50 (one query per call, as a web request does) per precision.
2. Quality over whole abstracts (title + text, truncated where the model truncates, one vector each;
   5,183 documents): dense nDCG@10 of every pairing of a query side with a passage side, on SciFact's
   test (300) and train (809) queries, each beside PyTorch/PyTorch with a paired bootstrap 95% interval
   of the difference (2,000 resamples of the queries). Vectors are cached under --cache by text hash.
3. With ``--indexes TORCH_DIR INT8_DIR``: the same pairings over the platform's own chunk vectors, read
   from two data directories in which ``manage.py evaluate --dataset scifact`` ran with
   ``EMBEDDING_BACKEND=torch`` and ``onnx-int8`` (12,760 chunks; a document scores its best chunk).

    .venv/bin/python benchmarks/int8_recipes.py --threads 1 [--indexes /tmp/scifact-torch /tmp/scifact-onnx-int8]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apps.knowledge.rag.embedder import (  # noqa: E402
    _THREADS,
    BACKEND_ONNX,
    BACKEND_TORCH,
    KIND_SENTENCE_TRANSFORMERS,
    ModelSpec,
    _bert_feed,
    _run_sorted,
    configure_threads,
    default_model_path,
    get_encoder,
)
from apps.knowledge.rag.evaluation import load_beir, ndcg_at_k  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "scifact")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=ROOT / "var" / "vector-cache")
    parser.add_argument("--model-cache", type=Path, default=ROOT / "var" / "embedding-cache")
    parser.add_argument("--speed-docs", type=int, default=200)
    parser.add_argument("--indexes", nargs=2, metavar=("TORCH_DIR", "INT8_DIR"),
                        help="data directories of `evaluate --dataset scifact` runs on torch and onnx-int8")
    args = parser.parse_args()
    configure_threads(args.threads)
    corpus, queries, qrels = load_beir(args.dataset)
    doc_ids = sorted(corpus)
    texts = [f"{corpus[d]['title']}\n\n{corpus[d]['text']}" for d in doc_ids]
    qtexts = [queries[q] for q in sorted(queries)]
    spec = ModelSpec("all-minilm-l6-v2", KIND_SENTENCE_TRANSFORMERS, default_model_path())
    torch_model = get_encoder(spec, backend=BACKEND_TORCH, cache_dir=args.model_cache)
    onnx_model = get_encoder(spec, backend=BACKEND_ONNX, cache_dir=args.model_cache)
    encoders = {"torch": torch_model.encode_passages, "int8": onnx_model.encode_passages,
                "float": float_onnx_encoder(onnx_model, args.model_cache)}
    print(f"threads={args.threads} corpus={len(texts)} queries={len(qtexts)}", flush=True)

    speed_texts = texts[:args.speed_docs]
    tokens = sum(min(n, torch_model.max_tokens) for n in torch_model.count_tokens_batch(speed_texts))
    speed = {}
    for name, encode in encoders.items():
        encode(speed_texts[:4])  # load and warm up
        cpu = time.process_time()
        encode(speed_texts)
        tok_s = tokens / (time.process_time() - cpu)
        latencies = []
        for text in qtexts[:100]:
            t = time.perf_counter()
            encode([text])
            latencies.append((time.perf_counter() - t) * 1000)
        speed[name] = (tok_s, statistics.median(latencies))
        print(f"{name}: ingestion {tok_s:.0f} tokens/s CPU, query p50 {speed[name][1]:.2f} ms", flush=True)

    passages = {n: cached(encode, n, texts, args.cache) for n, encode in encoders.items()}
    pairings = [("torch", "torch"), ("int8", "int8"), ("float", "int8"), ("int8", "torch"), ("float", "float")]
    print("\n| split | queries | passages | dense nDCG@10 | vs PyTorch (95% interval) | queries changed |")
    print("|---|---|---|---|---|---|")
    chunked = load_index_vectors(args.indexes) if args.indexes else None
    rows_chunked = []
    for split in ("test", "train"):
        _, queries, qrels = load_beir(args.dataset, split)
        qids = sorted(queries)
        qtexts = [queries[q] for q in qids]
        query_vecs = {n: cached(encode, f"{n}-q", qtexts, args.cache) for n, encode in encoders.items()}
        report(split, "abstracts", pairings, query_vecs, passages, doc_ids, qids, qrels, print)
        if chunked is not None:
            chunk_docs, chunk_vecs = chunked
            report(split, "chunks", [p for p in pairings if "float" not in p[1]], query_vecs, chunk_vecs,
                   chunk_docs, qids, qrels, rows_chunked.append)
    for row in rows_chunked:
        print(row)
    base_tok, base_q = speed["torch"]
    print("\n| precision | ingestion tokens/s CPU | x PyTorch | query p50 ms | x PyTorch |")
    print("|---|---|---|---|---|")
    for name, (tok_s, q50) in speed.items():
        print(f"| {name} | {tok_s:.0f} | {tok_s / base_tok:.2f} | {q50:.2f} | {base_q / q50:.2f} |")


def report(split, unit, pairings, query_vecs, passages, doc_of, qids, qrels, emit) -> None:
    rng = np.random.default_rng(0)
    per_query = {}
    for qn, pn in pairings:
        scores = query_vecs[qn] @ passages[pn].T
        values = []
        for qi, q in enumerate(qids):
            order = np.argsort(-scores[qi])[:300]
            values.append(ndcg_at_k(list(dict.fromkeys(doc_of[i] for i in order)), qrels[q], 10))
        per_query[(qn, pn)] = np.asarray(values)
    base = per_query[("torch", "torch")]
    for (qn, pn), values in per_query.items():
        diff = values - base
        boots = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(2000)]
        low, high = np.percentile(boots, [2.5, 97.5])
        emit(f"| {split} ({len(qids)}), {unit} | {qn} | {pn} | {values.mean():.4f} | {diff.mean():+.4f} "
             f"[{low:+.4f}, {high:+.4f}] | {int((np.abs(diff) > 1e-9).sum())} |")


_DUMP = """
import sys, numpy as np, django
django.setup()
from apps.knowledge.models import Chunk
rows = list(Chunk.objects.filter(superseded_at__isnull=True, document__deleted_at__isnull=True,
            document__knowledge_base__slug="eval-scifact").order_by("content_hash", "document__source_name")
            .values_list("content_hash", "document__source_name", "embedding"))
np.savez(sys.argv[1], hashes=np.array([r[0] for r in rows]), names=np.array([r[1] for r in rows]),
         vecs=np.stack([np.frombuffer(r[2], dtype="<f4") for r in rows]))
"""


def load_index_vectors(dirs: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """(document id per chunk, {"torch": vectors, "int8": vectors}) of the eval-scifact bases of two data dirs."""
    loaded = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, data_dir in zip(("torch", "int8"), dirs):
            out = Path(tmp) / f"{name}.npz"
            env = {**os.environ, "KOTAEMON_DEMO": "1", "KOTAEMON_DATA_DIR": data_dir,
                   "DJANGO_SETTINGS_MODULE": "kotaemon_site.settings", "LOG_LEVEL": "WARNING"}
            subprocess.run([sys.executable, "-c", _DUMP, str(out)], cwd=ROOT, env=env, check=True)
            loaded.append(dict(np.load(out)))
    torch_rows, int8_rows = loaded
    if not (torch_rows["hashes"] == int8_rows["hashes"]).all():
        raise SystemExit("the two bases do not hold the same chunks")
    docs = [name.removesuffix(".txt") for name in torch_rows["names"]]
    return docs, {"torch": torch_rows["vecs"], "int8": int8_rows["vecs"]}


def float_onnx_encoder(onnx_model, cache_dir: Path):
    """The float graph the int8 one is quantised from, exported once into the model cache."""
    from apps.knowledge.rag.embedder_onnx import OrtEncoder, _export

    path = cache_dir / f"{onnx_model.onnx_path().parent.name}-float" / "model.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        module, example, names, axes = onnx_model._export_module()
        _export(module, example, names, axes, path)
    session = OrtEncoder(path, threads=_THREADS["n"])
    tokenizer = onnx_model._batch_tokenizer()

    def encode(batch: list[str]) -> np.ndarray:
        encodings = tokenizer.encode_batch(list(batch))
        return _run_sorted([e.ids for e in encodings], 1, lambda rows: session.run(
            _bert_feed(rows, [encodings[i] for i in rows])), onnx_model.dimension)

    return encode


def cached(encode, name: str, texts: list[str], cache: Path) -> np.ndarray:
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:20]
    path = cache / f"int8-recipes-{name}-{digest}.npy"
    if path.is_file():
        return np.load(path)
    started = time.perf_counter()
    vectors = np.asarray(encode(texts), dtype=np.float32)
    print(f"encoded {len(texts)} texts with {name} in {time.perf_counter() - started:.0f} s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


if __name__ == "__main__":
    main()
