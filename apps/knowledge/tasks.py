"""Celery tasks: thin wrappers that take ids, re-fetch and call a service. All are idempotent.

Only transient failures (database, broker, network) are retried, with exponential backoff; bad
input is never retried: ingestion stores its error code on the Document instead of raising.
"""
from __future__ import annotations

import logging

from celery import shared_task
from django.db import DatabaseError, InterfaceError, OperationalError

from . import services

logger = logging.getLogger(__name__)

TRANSIENT = (services.TransientError, OperationalError, InterfaceError, ConnectionError, TimeoutError)
_RETRY = {"autoretry_for": TRANSIENT, "retry_backoff": 5, "retry_backoff_max": 300, "retry_jitter": True,
          "max_retries": 6, "acks_late": True}


def _give_up_on_document(task, exc, task_id, args, kwargs, einfo) -> None:
    document_id = args[0] if args else kwargs.get("document_id")
    if document_id is None:
        return
    code = "fetch_failed" if isinstance(exc, services.TransientError) else "processing_error"
    try:
        services.document_mark_failed(document_id=document_id, code=code,
                                      message=f"Ingestion failed after retries: {type(exc).__name__}: {exc}")
    except DatabaseError:
        logger.exception("could not record the ingest failure", extra={"document_id": document_id})


@shared_task(name="knowledge.ingest_document", on_failure=_give_up_on_document, **_RETRY)
def ingest_document(document_id: int, force: bool = False) -> dict | None:
    outcome = services.document_ingest(document_id=document_id, force=force)
    return None if outcome is None else {"status": outcome.status, "chunks": outcome.chunks,
                                         "encoded": outcome.encoded, "error_code": outcome.error_code}


@shared_task(name="knowledge.rebuild_index", **_RETRY)
def rebuild_index(knowledge_base_id: int, force: bool = False) -> dict:
    result = services.index_rebuild(knowledge_base_id=knowledge_base_id, force=force)
    return {"status": result.status, "version": result.version, "chunks": result.chunk_count}


@shared_task(name="knowledge.delete_document", **_RETRY)
def delete_document(document_id: int) -> bool:
    return services.document_purge(document_id=document_id)


@shared_task(name="knowledge.cleanup_indexes", **_RETRY)
def cleanup_indexes() -> int:
    return services.index_versions_cleanup()


@shared_task(name="knowledge.purge_knowledge_base", **_RETRY)
def purge_knowledge_base(knowledge_base_id: int) -> bool:
    return services.knowledge_base_purge(knowledge_base_id=knowledge_base_id)


@shared_task(name="knowledge.sweep", **_RETRY)
def sweep() -> dict:
    return services.knowledge_sweep().to_dict()
