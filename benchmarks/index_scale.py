"""Index maintenance at scale (issue 13): a 1M-chunk base built, extended and searched; a 1,000-file upload.

    .venv/bin/python benchmarks/index_scale.py rag --chunks 1000000 [--compression ivfpq|""] [--mmap]
    KOTAEMON_DEMO=1 KOTAEMON_DATA_DIR=/tmp/bulk .venv/bin/python benchmarks/index_scale.py bulk --files 1000

`rag` (pure rag/, no database): synthetic 384-d unit vectors (clustered, like embeddings) for size,
real text for BM25 (SciFact abstracts cut into ~40-word chunks and re-drawn to the chunk count). Each
phase runs in its own child process so its peak RSS (ru_maxrss) is its own:
  build    stream the whole base into one segment in batches of 4,096 (what a merge or full build does)
  add      one new document (10 chunks) as a new segment + a view over both: the incremental path
  serve    RSS of a process holding the 1M view; then the swap to the view with the new document
           (only the new segment is read) and search p50/p95 for dense, BM25 and hybrid
`bulk` (Django, embedded default, eager Celery): 1,000 small Markdown files through documents_upload in
one call, as one REST request does; reports time and index versions.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SCIFACT = Path(os.environ.get("SCIFACT_CORPUS", "/work/shared/datasets/scifact/corpus.jsonl.gz"))
DIM = 384
BATCH = 4096


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


_POOL: list[str] = []


def words_pool() -> list[str]:
    if _POOL:
        return _POOL
    words = _POOL
    with gzip.open(SCIFACT, "rt", encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            words += re.findall(r"\S+", f"{doc.get('title', '')} {doc.get('text', '')}")
    return words


def batches(n: int, seed: int, start_id: int = 0):
    import numpy as np

    from apps.knowledge.rag.index import SegmentBatch

    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((256, DIM)).astype(np.float32)
    pool = words_pool()
    for offset in range(0, n, BATCH):
        size = min(BATCH, n - offset)
        vectors = centres[rng.integers(0, 256, size)] + 0.8 * rng.standard_normal((size, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        starts = rng.integers(0, len(pool) - 40, size)
        texts = [" ".join(pool[s:s + 40]) for s in starts]
        ids = np.arange(start_id + offset, start_id + offset + size, dtype=np.int64)
        yield SegmentBatch(ids, ids // 10, vectors, texts)


def child(phase: str, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "_" + phase, "--root", args.root, "--chunks", str(args.chunks),
                          "--compression", args.compression] + (["--mmap"] if args.mmap else []),
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def phase_build(args) -> dict:
    from apps.knowledge.rag.index import ViewSegment, write_segment, write_view

    started, cpu = time.perf_counter(), time.process_time()
    seg = write_segment(args.root, "s000001", batches(args.chunks, seed=1), dim=DIM, expected=args.chunks,
                        compression=args.compression)
    write_view(args.root, 1, [ViewSegment(seg["name"])], meta={}, dim=DIM)
    size = sum(f.stat().st_size for f in (Path(args.root) / "segments" / seg["name"]).iterdir())
    return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
            "peak_rss_mb": peak_mb(), "dense_kind": seg["dense_kind"], "segment_mb": size / 2**20,
            "segment": seg["name"]}


def phase_add(args) -> dict:
    from apps.knowledge.rag.index import ViewLayout, ViewSegment, write_segment, write_view

    layout = ViewLayout.read(Path(args.root) / "v000001")
    started = time.perf_counter()
    seg = write_segment(args.root, "s000002", batches(10, seed=2, start_id=10**9), dim=DIM, expected=10)
    write_view(args.root, 2, [ViewSegment(s["name"]) for s in layout.segments] + [ViewSegment(seg["name"])],
               meta={}, dim=DIM)
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_mb()}


def phase_serve(args) -> dict:
    import numpy as np

    from apps.knowledge.rag.index import IndexBundle

    base = rss_mb()
    started = time.perf_counter()
    old = IndexBundle.load(Path(args.root) / "v000001", mmap=args.mmap)
    load_s, held_mb = time.perf_counter() - started, rss_mb() - base
    started = time.perf_counter()
    new = IndexBundle.load(Path(args.root) / "v000002", mmap=args.mmap)  # beside the old one, sharing its segment
    swap_s = time.perf_counter() - started
    both_mb = rss_mb() - base
    assert new.parts[0].segment is old.parts[0].segment and new.loaded_segments == 1
    found = new.bm25_search(" ".join(next(batches(10, seed=2, start_id=10**9)).texts[0].split()[:12]), 1)
    rng = np.random.default_rng(3)
    pool = words_pool()
    queries = [" ".join(pool[s:s + 6]) for s in rng.integers(0, len(pool) - 6, 100)]
    vectors = next(batches(100, seed=4)).vectors
    timings = {}
    for mode in ("dense", "bm25", "hybrid"):
        samples = []
        for query, vector in zip(queries, vectors):
            t = time.perf_counter()
            if mode == "dense":
                new.dense_search(vector, 100)
            elif mode == "bm25":
                new.bm25_search(query, 100)
            else:
                new.hybrid_search(query, vector, k=10, candidates=100)
            samples.append(1000 * (time.perf_counter() - t))
        timings[mode] = {"p50_ms": float(np.percentile(samples, 50)), "p95_ms": float(np.percentile(samples, 95))}
    recall = None
    if args.compression == "ivfpq":
        # IVF-PQ against exact search on the same 100k vectors (synthetic: real embeddings are easier for PQ).
        from apps.knowledge.rag.index import DenseIndex

        sample = list(batches(100_000, seed=5))
        ids = np.concatenate([b.ids for b in sample])
        matrix = np.vstack([b.vectors for b in sample])
        exact, compressed = DenseIndex(ids, matrix), DenseIndex(ids, matrix, compression="ivfpq")
        probes = next(batches(50, seed=6)).vectors
        recall = float(np.mean([len({i for i, _ in exact.search(q, 10)} & {i for i, _ in compressed.search(q, 10)}) / 10
                                for q in probes]))
    return {"load_seconds": load_s, "held_mb": held_mb, "swap_seconds": swap_s, "both_held_mb": both_mb,
            "new_document_found": bool(found and found[0][0] >= 10**9), "search": timings,
            "estimated_bytes": new.nbytes(), "ivfpq_recall_at_10_100k": recall}


def run_rag(args) -> None:
    args.root = args.root or tempfile.mkdtemp(prefix="index-scale-")
    started = time.time()
    build = child("build", args)
    add = child("add", args)
    serve = child("serve", args)
    print(json.dumps({"chunks": args.chunks, "compression": args.compression or "none", "mmap": args.mmap,
                      "build": build, "add_one_document": add, "serve": serve,
                      "total_seconds": time.time() - started}, indent=2))


def run_bulk(args) -> None:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kotaemon_site.settings")
    django.setup()
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from django.contrib.auth import get_user_model

    from apps.knowledge import services
    from apps.knowledge.models import Document, IndexVersion, KnowledgeBase
    from kotaemon_site.celery import app

    app.conf.task_always_eager = True
    user, _ = get_user_model().objects.get_or_create(username="bench", defaults={"is_staff": True,
                                                                              "is_superuser": True})
    KnowledgeBase.objects.filter(slug="bulk-bench").delete()
    kb = KnowledgeBase.objects.create(slug="bulk-bench", name="Bulk", owner=user)
    pool = words_pool()
    files = [SimpleUploadedFile(f"doc-{i:04d}.md", f"# Document {i}\n\n{' '.join(pool[i * 60:i * 60 + 60])}\n".encode())
             for i in range(args.files)]
    started, cpu = time.perf_counter(), time.process_time()
    services.documents_upload(knowledge_base=kb, user=user, files=files)
    seconds = time.perf_counter() - started
    versions = list(IndexVersion.objects.filter(knowledge_base=kb).values_list("version", "build_kind",
                                                                               "document_count", "build_seconds"))
    print(json.dumps({"files": args.files, "seconds": seconds, "cpu_seconds": time.process_time() - cpu,
                      "ready": Document.objects.filter(knowledge_base=kb, status="ready").count(),
                      "versions": versions}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["rag", "bulk", "_build", "_add", "_serve"])
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--compression", default="")
    parser.add_argument("--mmap", action="store_true")
    parser.add_argument("--root", default="")
    args = parser.parse_args()
    if args.phase == "rag":
        run_rag(args)
    elif args.phase == "bulk":
        run_bulk(args)
    else:
        result = {"_build": phase_build, "_add": phase_add, "_serve": phase_serve}[args.phase](args)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
