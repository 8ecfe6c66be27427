"""The automatic embedding model under a bulk upload's one-task-per-file ingestion, in a chosen file order.

    KOTAEMON_DEMO=1 KOTAEMON_DATA_DIR=/tmp/bench-rest .venv/bin/python manage.py migrate
    KOTAEMON_DEMO=1 KOTAEMON_DATA_DIR=/tmp/bench-rest .venv/bin/python benchmarks/model_choice_upload.py \\
        --documents var/devsets/zh --questions benchmarks/devsets/zh.jsonl [--order latin-first|cjk-first|name]

A base is created with default settings (`services.knowledge_base_create`, no model), every file is imported
(names relative to the folder, as the question set expects), then ingested one document per call, in order,
as the Celery tasks of one REST upload are (`services.document_ingest`), and the index is brought up to date.
Prints the model chosen and why, every index version (model, kind, chunks, chunks encoded by the build) and
the models of the stored vectors; with `--questions`, `manage.py evaluate --kb` on the base. `latin-first`
(the default) puts the files without CJK text first: the worst order for the automatic choice (the base
decides English, then switches and re-embeds).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", required=True)
    parser.add_argument("--questions")
    parser.add_argument("--order", choices=["latin-first", "cjk-first", "name"], default="latin-first")
    parser.add_argument("--slug", default="upload-order")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kotaemon_site.settings")
    os.environ.setdefault("KOTAEMON_DEMO", "1")
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from apps.knowledge import services
    from apps.knowledge.model_choice import embedding_choice_reason
    from apps.knowledge.models import Chunk, IndexVersion, KnowledgeBase
    from apps.knowledge.rag.language import language_mix

    root = Path(args.documents)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if args.order != "name":
        cjk = {p: language_mix(p.read_bytes().decode("utf-8", "replace")).cjk > 0 for p in files}
        files.sort(key=lambda p: cjk[p] if args.order == "latin-first" else not cjk[p])
    user, _ = get_user_model().objects.get_or_create(username="bench-model-choice",
                                                     defaults={"is_superuser": True, "is_staff": True})
    KnowledgeBase.objects.filter(slug=args.slug).delete()
    kb = services.knowledge_base_create(user=user, slug=args.slug, name=args.slug)
    documents = [services.document_import(knowledge_base=kb, user=user, name=str(p.relative_to(root)),
                                          data=p.read_bytes()).document for p in files]
    started = time.perf_counter()
    for document in documents:
        services.document_ingest(document_id=document.pk)
    services.index_rebuild(knowledge_base_id=kb.pk)
    kb.refresh_from_db()
    print(f"{len(documents)} files ({args.order}), ingest + build {time.perf_counter() - started:.1f} s")
    print(f"model: {kb.embedding_model}; {embedding_choice_reason(kb)}")
    print(f"choice: {kb.embedding_choice}")
    for version in IndexVersion.objects.filter(knowledge_base=kb).order_by("version"):
        print(f"v{version.version} {version.status} {version.embedding_key} {version.build_kind} "
              f"chunks={version.chunk_count} encoded_by_build={version.encoded_count}")
    models = sorted(set(Chunk.objects.filter(document__knowledge_base=kb, superseded_at__isnull=True)
                        .values_list("embedding_model", flat=True)))
    print(f"stored vectors: {models}")
    if args.questions:
        call_command("evaluate", questions=args.questions, kb=args.slug, no_progress=True)


if __name__ == "__main__":
    main()
