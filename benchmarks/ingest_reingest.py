"""End-to-end ingestion throughput vs raw model encoding, and re-ingest speed-up.

    .venv/bin/python benchmarks/ingest_reingest.py [--docs 1000] [--threads 2] [--dataset ../shared/datasets/scifact]

What is measured, in one process, on a fresh SQLite database and index root (so nothing is reused
from earlier runs):

1. raw: the model encoding the very chunk texts that ingestion produces (same parser, chunker and
   sizes; same batch size), once before each end-to-end run and once after the last (the machine is
   shared and its load drifts, so every end-to-end run sits between two raw runs);
2. end-to-end: `services.files_ingest` on N SciFact abstracts written as .txt files: import (file
   storage, sha256), parse, chunk, embed, write chunks, build and activate the index; `--rounds`
   times, each from an empty database (nothing to reuse).
3. re-ingest: the same call again with unchanged files (every document is `unchanged`).
4. forced re-ingest: re-parse and re-chunk everything, vectors reused from storage.

Targets (issue 3): end-to-end >= 85% of raw throughput; re-ingest >= 20x faster than the first ingest.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="end-to-end runs, each between two raw encodes")
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "datasets" / "scifact"))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="kotaemon-bench-"))
    # As the management commands do: OpenMP threads wait passively (see commands/_process.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.update({"KOTAEMON_DEMO": "1", "KOTAEMON_DATA_DIR": str(workdir), "LOG_LEVEL": "WARNING",
                       "TORCH_NUM_THREADS": str(args.threads), "CELERY_TASK_ALWAYS_EAGER": "1"})
    for name in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"):
        os.environ.pop(name, None)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kotaemon_site.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)

    from apps.knowledge import services
    from apps.knowledge.embeddings import embedder
    from apps.knowledge.models import Chunk, KnowledgeBase
    from apps.knowledge.rag.chunker import chunk_document
    from apps.knowledge.rag.embedder import configure_threads
    from apps.knowledge.rag.parsers import parse

    configure_threads(args.threads)
    model = embedder()
    model.warm_up()

    files_dir = workdir / "corpus"
    files_dir.mkdir()
    files = []
    with gzip.open(Path(args.dataset) / "corpus.jsonl.gz", "rt", encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            path = files_dir / f"{doc['_id']}.txt"
            path.write_text(f"{doc['title']}\n\n{doc['text']}", encoding="utf-8")
            files.append((path.name, path))
            if len(files) == args.docs:
                break

    # The chunk texts ingestion will produce, from the same parser and chunker with the same sizes,
    # so the raw encodes can run before as well as after the end-to-end run (the machine is shared
    # and its load drifts: each end-to-end run is compared with the raw runs around it).
    sizes = KnowledgeBase(slug="sizes")
    texts = [spec.text for _, path in files for spec in chunk_document(
        parse(path.read_bytes(), filename=path.name), count_tokens=model.count_tokens,
        chunk_tokens=sizes.chunk_tokens, overlap_tokens=sizes.chunk_overlap)]

    raw_cpu: list[float] = []
    e2e_cpu: list[float] = []

    def raw_encode() -> float:
        started, cpu = time.perf_counter(), time.process_time()
        model.encode(texts)
        raw_cpu.append(time.process_time() - cpu)
        return time.perf_counter() - started

    raw_runs, e2e_runs = [raw_encode()], []
    for _ in range(args.rounds):
        # Start from nothing each round, so every chunk is encoded again (no stored vector to reuse).
        KnowledgeBase.objects.all().delete()
        kb = KnowledgeBase.objects.create(slug="bench", name="Benchmark")
        started, cpu = time.perf_counter(), time.process_time()
        first = services.files_ingest(knowledge_base=kb, files=files)
        e2e_runs.append(time.perf_counter() - started)
        e2e_cpu.append(time.process_time() - cpu)
        raw_runs.append(raw_encode())
    assert Chunk.objects.filter(document__knowledge_base=kb).count() == len(texts)
    raw, e2e = statistics.mean(raw_runs), statistics.mean(e2e_runs)

    started = time.perf_counter()
    again = services.files_ingest(knowledge_base=kb, files=files)
    reingest = time.perf_counter() - started
    started = time.perf_counter()
    forced = services.files_ingest(knowledge_base=kb, files=files, force=True)
    forced_seconds = time.perf_counter() - started

    counts = first.counts()
    assert counts["ready"] == len(files), counts
    assert again.counts()["unchanged"] == len(files) and again.encoded == 0
    assert forced.encoded == 0
    tokens = sum(Chunk.objects.filter(document__knowledge_base=kb).values_list("token_count", flat=True))
    print(f"\n{len(files)} SciFact documents -> {len(texts)} chunks ({tokens} tokens), torch threads {args.threads}, "
          f"batch {model.batch_size}, load average {os.getloadavg()[0]:.1f}\n")
    print("| step | seconds | docs/s | chunks/s | vs raw / first |")
    print("|---|---|---|---|---|")
    print(f"| raw encode of the same chunks (mean of {len(raw_runs)}: "
          f"{', '.join(f'{r:.1f}' for r in raw_runs)}) | {raw:.1f} | {len(files) / raw:.1f} | {len(texts) / raw:.1f} | 100% |")
    print(f"| end-to-end first ingest: import, parse, chunk, embed, store, index (mean of {len(e2e_runs)}: "
          f"{', '.join(f'{r:.1f}' for r in e2e_runs)}) | {e2e:.1f} | "
          f"{len(files) / e2e:.1f} | {len(texts) / e2e:.1f} | {100 * raw / e2e:.0f}% of raw throughput |")
    ratios = [raw_pair / run for raw_pair, run in zip(
        [statistics.mean(raw_runs[i:i + 2]) for i in range(len(e2e_runs))], e2e_runs)]
    print(f"| end-to-end vs the two raw runs around it, per round | - | - | - | "
          f"{', '.join(f'{100 * r:.0f}%' for r in ratios)} |")
    print(f"| CPU seconds of this process: raw {statistics.mean(raw_cpu):.1f}, end-to-end {statistics.mean(e2e_cpu):.1f} "
          f"| - | - | - | {100 * statistics.mean(raw_cpu) / statistics.mean(e2e_cpu):.0f}% (insensitive to other load) |")
    print(f"| re-ingest, unchanged files | {reingest:.2f} | {len(files) / reingest:.0f} | - | "
          f"{e2e / reingest:.0f}x faster than first |")
    print(f"| forced re-ingest (re-parse, re-chunk, vectors reused, new index v{forced.build.version}) | "
          f"{forced_seconds:.2f} | {len(files) / forced_seconds:.0f} | - | {e2e / forced_seconds:.0f}x faster than first |")
    print(f"\nscratch data: {workdir} (delete it when done)")


if __name__ == "__main__":
    main()
