"""Index maintenance at scale (issue 13): a 1M-chunk base built, extended and searched; a 1,000-file upload.

    nice -n 10 .venv/bin/python benchmarks/index_scale.py rag --chunks 1000000 [--compression ivfpq] [--mmap]
        [--hnsw-threshold N]
    nice -n 10 .venv/bin/python benchmarks/index_scale.py recall --chunks 60000
    KOTAEMON_DEMO=1 KOTAEMON_DATA_DIR=/tmp/bulk .venv/bin/python benchmarks/index_scale.py bulk --files 1000
    KOTAEMON_DEMO=1 LOG_LEVEL=WARNING .venv/bin/python benchmarks/index_scale.py baseline
    KOTAEMON_DEMO=1 KOTAEMON_DATA_DIR=/tmp/add1m LOG_LEVEL=WARNING .venv/bin/python benchmarks/index_scale.py \
        django-add --root /tmp/index-scale-1m     (after `rag --root /tmp/index-scale-1m`)

`rag` (pure rag/, no database): synthetic 384-d unit vectors (clustered, like embeddings) for size,
real text for BM25 (SciFact abstracts cut into ~40-word chunks and re-drawn to the chunk count). Each
phase runs in its own child process so its peak RSS (ru_maxrss) is its own:
  build    stream the whole base into one segment in batches of 4,096 (what a merge or full build does)
  serve    RSS of a process holding the 1M view; then, in that process, one new document (10 chunks, its
           embeddings already in memory as the worker's are in the database): the incremental segment,
           the view over both, the load of the new view beside the held one (only the new segment is read)
           and the first search that finds it, timed from "embeddings stored" to "found"; then search
           p50/p95 for dense, BM25 and hybrid
`recall` (pure rag/): real all-MiniLM-L6-v2 embeddings of real text (SciFact abstracts in ~40-word chunks
plus plain-text files of /usr/share/doc), SciFact queries; recall@10 of IVF-PQ (and HNSW) against exact
search, and bytes per vector of each.
`django-add` (Django, embedded default): one new document in the base `rag` built, through the real
services (the worker's incremental `index_rebuild`, the web process's registry and `chunks_retrieve`),
timed from its embeddings being committed to the first search that returns it.
`baseline` (Django): RSS of an idle worker process with the default embedder loaded and used once.
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
                          "--compression", args.compression, "--hnsw-threshold", str(args.hnsw_threshold)]
                         + (["--mmap"] if args.mmap else []),
                         capture_output=True, text=True,
                         # as deployed: the worker builds with 2 threads, a web process searches with 1
                         env={**os.environ, "OMP_NUM_THREADS": "2" if phase == "build" else "1",
                              "OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _doc_arrays(ids) -> dict:
    """The per-version document arrays a real build writes (document ids and their ingest stamps)."""
    import numpy as np

    docs = np.unique(np.asarray(ids, dtype=np.int64) // 10)
    return {"doc_ids": docs, "doc_stamps": np.full(len(docs), 1, dtype=np.int64)}


def phase_build(args) -> dict:
    import numpy as np

    from apps.knowledge.rag.index import ViewSegment, write_segment, write_view

    started, cpu = time.perf_counter(), time.process_time()
    seg = write_segment(args.root, "s000001", batches(args.chunks, seed=1), dim=DIM, expected=args.chunks,
                        compression=args.compression, hnsw_threshold=args.hnsw_threshold)
    write_view(args.root, 1, [ViewSegment(seg["name"])], meta={}, dim=DIM,
               arrays=_doc_arrays(np.arange(args.chunks)))
    size = sum(f.stat().st_size for f in (Path(args.root) / "segments" / seg["name"]).iterdir())
    return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
            "peak_rss_mb": peak_mb(), "dense_kind": seg["dense_kind"], "segment_mb": size / 2**20,
            "segment": seg["name"]}


def add_document(args, layout_path: Path, batch) -> Path:
    """What an incremental build does for one new document once its embeddings are stored: read the parent
    view's layout (memory-mapped arrays), write the document's segment, write the view over both."""
    import numpy as np

    from apps.knowledge.rag.index import ViewLayout, ViewSegment, write_segment, write_view

    layout = ViewLayout.read(layout_path)
    doc_ids, stamps = layout.array("doc_ids"), layout.array("doc_stamps")
    new_docs = np.unique(batch.doc_ids)
    seg = write_segment(args.root, "s000002", iter([batch]), dim=DIM, expected=len(batch.ids),
                        compression=args.compression, hnsw_threshold=args.hnsw_threshold)
    return write_view(args.root, 2, [ViewSegment(s["name"], s["tombstones"]) for s in layout.segments]
                      + [ViewSegment(seg["name"])], meta={}, dim=DIM,
                      arrays={"doc_ids": np.concatenate([doc_ids, new_docs]),
                              "doc_stamps": np.concatenate([stamps, np.full(len(new_docs), 2, dtype=np.int64)])})


def phase_serve(args) -> dict:
    import numpy as np

    from apps.knowledge.rag.index import IndexBundle

    base = rss_mb()
    started = time.perf_counter()
    old = IndexBundle.load(Path(args.root) / "v000001", mmap=args.mmap)
    load_s, held_mb = time.perf_counter() - started, rss_mb() - base
    # One new document: its 10 chunks' vectors and texts are ready (stored by the ingest) before the clock starts.
    new_batch = next(batches(10, seed=2, start_id=10**9))
    new_batch.texts = [f"{text} quokkazebra{i}" for i, text in enumerate(new_batch.texts)]  # its own words
    query_text = " ".join(new_batch.texts[3].split()[:6]) + " quokkazebra3"
    query_vec = new_batch.vectors[3]
    t0 = time.perf_counter()
    view = add_document(args, Path(args.root) / "v000001", new_batch)
    written = time.perf_counter()
    new = IndexBundle.load(view, mmap=args.mmap)  # beside the old one, sharing its segment
    loaded = time.perf_counter()
    found_bm25 = new.bm25_search(query_text, 10)
    found_dense = new.dense_search(query_vec, 10)
    t1 = time.perf_counter()
    both_mb = rss_mb() - base
    assert new.parts[0].segment is old.parts[0].segment and new.loaded_segments == 1
    new_doc = {"seconds": t1 - t0, "write_segment_and_view_s": written - t0, "load_beside_s": loaded - written,
               "first_searches_s": t1 - loaded,
               "found_by_bm25": bool(found_bm25 and found_bm25[0][0] == int(new_batch.ids[3])),
               "found_by_dense": bool(found_dense and found_dense[0][0] == int(new_batch.ids[3]))}
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
    return {"load_seconds": load_s, "held_mb": held_mb, "rss_after_load_mb": base + held_mb,
            "new_document": new_doc, "both_held_mb": both_mb, "rss_end_mb": rss_mb(), "peak_rss_mb": peak_mb(),
            "search": timings, "estimated_bytes": new.nbytes()}


def run_rag(args) -> None:
    args.root = args.root or tempfile.mkdtemp(prefix="index-scale-")
    started = time.time()
    build = child("build", args)
    serve = child("serve", args)
    print(json.dumps({"chunks": args.chunks, "compression": args.compression or "none", "mmap": args.mmap,
                      "hnsw_threshold": args.hnsw_threshold, "root": args.root, "build": build, "serve": serve,
                      "total_seconds": time.time() - started}, indent=2))


def real_chunks(limit: int) -> list[str]:
    """Real text in ~40-word chunks: SciFact abstracts, then plain-text files of /usr/share/doc."""
    chunks: list[str] = []
    with gzip.open(SCIFACT, "rt", encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            words = f"{doc.get('title', '')}. {doc.get('text', '')}".split()
            chunks += [" ".join(words[i:i + 40]) for i in range(0, len(words), 40) if len(words[i:i + 40]) >= 12]
    seen = set(chunks)
    for path in sorted(Path("/usr/share/doc").rglob("*")):
        if len(chunks) >= limit:
            break
        if not path.is_file() or path.suffix in {".gz", ".html", ".png", ".svg", ".pdf", ".js", ".css"}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        words = text.split()
        for i in range(0, len(words), 40):
            piece = " ".join(words[i:i + 40])
            if len(words[i:i + 40]) >= 12 and piece not in seen:  # copyright files repeat licences verbatim
                seen.add(piece)
                chunks.append(piece)
    return chunks[:limit]


def run_recall(args) -> None:
    import numpy as np

    from apps.knowledge.rag.embedder import (KIND_SENTENCE_TRANSFORMERS, ModelSpec, configure_threads,
                                             default_model_path, get_encoder)
    from apps.knowledge.rag.index import DenseBuilder

    configure_threads(2)
    texts = real_chunks(args.chunks)
    model = get_encoder(ModelSpec("all-minilm-l6-v2", KIND_SENTENCE_TRANSFORMERS, default_model_path(), ""),
                        backend=os.environ.get("EMBEDDING_BACKEND", "auto"),
                        cache_dir=os.environ.get("EMBEDDING_CACHE_DIR", "/tmp/index-scale-embedding-cache"),
                        batch_size=64)
    Path(args.root or "/tmp").mkdir(parents=True, exist_ok=True)
    cache = Path(args.root or "/tmp") / f"recall-{len(texts)}-{model.model_id.replace('/', '_')}.npy"
    started = time.perf_counter()
    if cache.exists():
        vectors = np.load(cache)
    else:
        vectors = np.asarray(model.encode_passages(texts), dtype=np.float32)
        np.save(cache, vectors)
    encode_s = time.perf_counter() - started
    queries = [json.loads(line)["text"] for line in (SCIFACT.parent / "queries.jsonl").read_text().splitlines()]
    qvecs = np.asarray(model.encode_queries(queries), dtype=np.float32)
    ids = np.arange(len(vectors), dtype=np.int64)
    results = {}
    exact_builder = DenseBuilder(DIM, "flat")
    exact_builder.add(ids, vectors)
    exact = exact_builder.finish()
    truth = [{i for i, _ in row} for row in exact.search_batch(qvecs, 10)]
    for kind in ("hnsw", "ivfpq"):
        builder = DenseBuilder(DIM, kind, expected=len(ids))
        t = time.perf_counter()
        for start in range(0, len(ids), BATCH):
            builder.add(ids[start:start + BATCH], vectors[start:start + BATCH])
        index = builder.finish()
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        found = index.search_batch(qvecs, 10)
        search_ms = 1000 * (time.perf_counter() - t) / len(qvecs)
        recall = float(np.mean([len({i for i, _ in row} & want) / 10 for row, want in zip(found, truth)]))
        results[kind] = {"recall_at_10": recall, "build_s": build_s, "search_ms_per_query": search_ms,
                         "estimated_bytes_per_vector": index.nbytes() / len(ids), "nprobe": index.nprobe,
                         "ef_search": index.ef_search}
        if kind == "ivfpq":  # the recall/latency trade-off of the lists probed (32 is the default)
            sweep = {}
            for nprobe in (16, 64, 128):
                index.nprobe = nprobe
                index._apply_search_params()
                t = time.perf_counter()
                found = index.search_batch(qvecs, 10)
                sweep[nprobe] = {"recall_at_10": float(np.mean([len({i for i, _ in row} & want) / 10
                                                                for row, want in zip(found, truth)])),
                                 "search_ms_per_query": 1000 * (time.perf_counter() - t) / len(qvecs)}
            results[kind]["nprobe_sweep"] = sweep
    results["flat"] = {"estimated_bytes_per_vector": exact.nbytes() / len(ids)}
    print(json.dumps({"chunks": len(texts), "queries": len(queries), "model": model.model_id,
                      "backend": getattr(model, "backend", ""), "encode_seconds": encode_s, "results": results},
                     indent=2))


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
    from django.conf import settings
    from django.utils import timezone

    started, cpu, wall = time.perf_counter(), time.process_time(), timezone.now()
    services.documents_upload(knowledge_base=kb, user=user, files=files)
    seconds = time.perf_counter() - started
    versions = list(IndexVersion.objects.filter(knowledge_base=kb).order_by("version").values(
        "version", "build_kind", "document_count", "written_count", "build_seconds", "created_at"))
    for version in versions:
        version["created_after_s"] = (version.pop("created_at") - wall).total_seconds()
    print(json.dumps({"files": args.files, "seconds": seconds, "cpu_seconds": time.process_time() - cpu,
                      "ready": Document.objects.filter(knowledge_base=kb, status="ready").count(),
                      "chunks_written_by_builds": sum(v["written_count"] for v in versions),
                      "wait_s": settings.KNOWLEDGE_REBUILD_MAX_WAIT_SECONDS,
                      "max_versions": settings.KNOWLEDGE_BULK_MAX_VERSIONS, "versions": versions}, indent=2))


def run_django_add(args) -> None:
    """One new document in a 1M-chunk base through the real service path: a knowledge base whose active
    version is a view over the segment `rag` built under --root (its 100k documents as Document rows with
    matching ingest stamps), held by this process's index registry as a web instance holds it; then one
    document's chunks and embeddings are committed (the clock starts), `index_rebuild` runs (the worker's
    incremental build: reads the documents' stamps, writes the 10-chunk segment and the view, activates,
    publishes knowledge_updated) and `chunks_retrieve` is polled until it returns the new document."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kotaemon_site.settings")
    django.setup()
    import datetime as dt

    import numpy as np
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import transaction

    call_command("migrate", verbosity=0)
    from apps.core.runtime import configure_process
    from apps.knowledge import services
    from apps.knowledge.embeddings import embedder_for_kb, vector_to_bytes
    from apps.knowledge.index_registry import registry
    from apps.knowledge.models import Chunk, Document, IndexVersion, KnowledgeBase
    from apps.knowledge.rag.index import (ViewSegment, analyzer_manifest, embedding_manifest, list_segments,
                                          write_view)
    from apps.knowledge.selectors import chunks_retrieve
    from kotaemon_site.celery import app

    configure_process(kind="web")
    app.conf.task_always_eager = True
    source = Path(args.root)
    segment = next(name for name in list_segments(source) if name.startswith("s000001-"))
    seg_docs = np.load(source / "segments" / segment / "docs.npy", mmap_mode="r")
    doc_count = int(seg_docs.max()) + 1
    user, _ = get_user_model().objects.get_or_create(username="bench", defaults={"is_staff": True,
                                                                              "is_superuser": True})
    KnowledgeBase.objects.filter(slug="scale-1m").delete()
    kb = KnowledgeBase.objects.create(slug="scale-1m", name="Scale 1M", owner=user, is_public=True)
    model, analyzer = embedder_for_kb(kb), services.kb_analyzer(kb)
    ingested = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    started = time.perf_counter()
    first_pk = (Document.objects.order_by("-pk").values_list("pk", flat=True).first() or 0) + 1
    for start in range(0, doc_count, 5000):
        Document.objects.bulk_create([
            Document(pk=first_pk + i, knowledge_base=kb, source_name=f"doc-{i}.md", sha256=f"{i:064x}",
                     status=Document.Status.READY, ingested_at=ingested, title=f"Document {i}")
            for i in range(start, min(doc_count, start + 5000))])
    setup_db_s = time.perf_counter() - started
    root = services.kb_index_root(kb.pk)
    (root / "segments").mkdir(parents=True, exist_ok=True)
    (root / "segments" / segment).symlink_to(source / "segments" / segment)
    pks = np.arange(first_pk, first_pk + doc_count, dtype=np.int64)
    described = {**model.describe(), "model": model.model_key or kb.embedding_model}
    view = write_view(root, 1, [ViewSegment(segment)],
                      meta={"model_id": model.model_id, "embedding": described, "knowledge_base": kb.pk,
                            "slug": kb.slug, "source_revision": kb.content_revision, "build_kind": "full"},
                      arrays={"doc_ids": pks, "doc_stamps": np.full(doc_count, services._stamp(ingested),
                                                                    dtype=np.int64)},
                      dim=model.dim, fields={**analyzer_manifest(analyzer),
                                             **embedding_manifest({"embedding": described}, model.dimension)})
    KnowledgeBase.objects.filter(pk=kb.pk).update(last_index_version=1)
    IndexVersion.objects.create(knowledge_base=kb, version=1, status=IndexVersion.Status.ACTIVE,
                                artifact_path=str(view), source_revision=kb.content_revision,
                                embedding_model=model.model_id, embedding_dimension=model.dimension,
                                document_count=doc_count, chunk_count=len(seg_docs), activated_at=ingested)
    base_rss = rss_mb()
    t = time.perf_counter()
    held = registry.bundle(kb.pk)
    load_s, held_mb = time.perf_counter() - t, rss_mb() - base_rss
    assert held is not None and held.version == 1

    texts = [f"New document paragraph {i}: the quokkazebra{i} procedure replaces the old filing rules."
             for i in range(10)]
    vectors = model.encode_passages(texts)
    with transaction.atomic():
        document = Document.objects.create(knowledge_base=kb, source_name="new.md", sha256="f" * 64,
                                           status=Document.Status.READY, title="New document",
                                           ingested_at=dt.datetime.now(dt.timezone.utc))
        Chunk.objects.bulk_create([
            Chunk(pk=10**9 + i, document=document, position=i, text=text, content_hash=f"{i:064x}",
                  embedding=vector_to_bytes(vector), embedding_model=model.model_id, token_count=20,
                  char_start=0, char_end=len(text))
            for i, (text, vector) in enumerate(zip(texts, vectors))])
        KnowledgeBase.objects.filter(pk=kb.pk).update(content_revision=kb.content_revision + 1)
    t0 = time.perf_counter()  # the document's embeddings are stored (committed)
    build = services.index_rebuild(knowledge_base_id=kb.pk)
    built = time.perf_counter()
    found = None
    while time.perf_counter() - t0 < 60:
        results = chunks_retrieve(user=user, query="quokkazebra3 procedure", knowledge_bases=[kb.pk], top_k=3,
                                  mode="bm25")
        if results and results[0].document_id == document.pk:
            found = time.perf_counter()
            break
        time.sleep(0.05)
    print(json.dumps({"documents": doc_count, "chunks": len(seg_docs), "setup_db_s": setup_db_s,
                      "registry_load_s": load_s, "held_mb": held_mb, "rss_mb": rss_mb(),
                      "build": {"status": build.status, "kind": build.kind, "written": build.written,
                                "seconds": built - t0},
                      "searchable_after_s": None if found is None else found - t0,
                      "version_check_seconds": settings.KNOWLEDGE_VERSION_CHECK_SECONDS,
                      "held_version_after": registry.held_versions().get(kb.pk)}, indent=2))


def run_baseline(args) -> None:
    """RSS of an idle worker process as deployed: Django set up, the default embedder loaded and used once
    (what a worker child holds before any build; a merge's peak adds to this)."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kotaemon_site.settings")
    django.setup()
    from apps.core.runtime import configure_process
    from apps.knowledge.embeddings import embedder

    configure_process(kind="worker")
    model = embedder()
    model.encode_passages(["warm up the encoder once, as the first ingest does"] * 32)
    print(json.dumps({"model": model.model_id, "backend": getattr(model, "backend", ""), "rss_mb": rss_mb(),
                      "peak_rss_mb": peak_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["rag", "recall", "bulk", "baseline", "django-add", "_build", "_serve"])
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--compression", default="")
    parser.add_argument("--mmap", action="store_true")
    parser.add_argument("--hnsw-threshold", type=int, default=50_000)
    parser.add_argument("--root", default="")
    args = parser.parse_args()
    if args.phase == "rag":
        run_rag(args)
    elif args.phase == "recall":
        run_recall(args)
    elif args.phase == "bulk":
        run_bulk(args)
    elif args.phase == "baseline":
        run_baseline(args)
    elif args.phase == "django-add":
        run_django_add(args)
    else:
        result = {"_build": phase_build, "_serve": phase_serve}[args.phase](args)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
