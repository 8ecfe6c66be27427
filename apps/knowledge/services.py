"""Writes for knowledge: knowledge bases, documents, ingestion, index versions, the demo knowledge base.

Flow (see DESIGN.md): an editor's change is committed, then a task is enqueued with the id
(transaction.on_commit). Ingestion parses, chunks and embeds (reusing stored embeddings), replaces the
document's chunks and bumps the knowledge base's content revision in one transaction. A rebuild
writes a NEW index version from stored vectors, activates it in one transaction and publishes
`knowledge_updated` after commit. Every step is idempotent, so re-delivered tasks change nothing.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.files.base import ContentFile, File
from django.db import transaction
from django.db.models import Exists, F, OuterRef, Q, Subquery
from django.utils import timezone
from django.utils.text import get_valid_filename
from django.utils.translation import gettext

from apps.core import authz
from apps.core.errors import ApplicationError, NotFound
from apps.core.events import publish_on_commit

from . import selectors
from .embeddings import (
    MODEL_AUTO,
    embedder_for_kb,
    model_catalog,
    vector_from_bytes,
    vector_to_bytes,
    vectors_for,
)
from .metrics import documents_ingested_total, index_build_seconds, index_builds_total
from .model_choice import BY_EDITOR, embedding_model_auto_enabled, embedding_model_resolve
from .models import Chunk, Document, IndexVersion, KnowledgeBase
from .rag.analyzer import Analyzer, get_analyzer, parse_user_dictionary
from .rag.chunker import ChunkSpec, chunk_document, content_hash, indexed_text
from .rag.embedder import BaseEmbedder
from .rag.errors import IngestError
from .rag.index import (
    MANIFEST_NAME,
    delete_unreferenced_segments,
    analyzer_manifest,
    delete_version,
    embedding_manifest,
    manifest_analyzer_matches,
    referenced_segments,
    remove_stale_tmp,
)
from .rag.language import LanguageMix, language_mix
from .rag.parsers import ParseLimits, ParsedDocument, parse

logger = logging.getLogger(__name__)

User = AbstractBaseUser | AnonymousUser

# Bump when parsing or chunking changes in a way that must re-chunk stored documents.
PIPELINE_VERSION = "4"  # 2: Chinese sentences, table rows with headers, literal Markdown identifiers, GB18030/Big5
#                         3: the embedding reads the search context (title, heading path) before the text
#                         4: HTML navigation (tables of contents, link bars) is left out; title acronyms in the context
INGEST_BATCH_DOCUMENTS = 64
_READ_BLOCK = 1 << 20


class TransientError(Exception):
    """A failure worth retrying later (network, database or broker hiccup); tasks retry these with backoff."""


class DocumentSourceError(Exception):
    """The document's bytes cannot be obtained (file gone, URL refused); stored on the Document."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# ------------------------------------------------------------------------------------------
# Limits
# ------------------------------------------------------------------------------------------


def parse_limits() -> ParseLimits:
    return ParseLimits(
        max_bytes=settings.KNOWLEDGE_MAX_UPLOAD_BYTES,
        max_pages=settings.KNOWLEDGE_MAX_PAGES,
        max_uncompressed_bytes=settings.KNOWLEDGE_MAX_UNCOMPRESSED_BYTES,
        max_compression_ratio=settings.KNOWLEDGE_MAX_COMPRESSION_RATIO,
        max_csv_rows=settings.KNOWLEDGE_MAX_CSV_ROWS,
    )


def upload_size_validate(*, size: int, name: str = "") -> None:
    limit = settings.KNOWLEDGE_MAX_UPLOAD_BYTES
    if size > limit:
        raise ApplicationError("too_large", gettext("%(name)s is %(size)s bytes; the limit is %(limit)s bytes.")
                                            % {"name": name or gettext("The file"), "size": size, "limit": limit},
                               details={"size": size, "limit": limit, "name": name}, status=413)


# ------------------------------------------------------------------------------------------
# Knowledge bases
# ------------------------------------------------------------------------------------------

KB_SETTINGS_FIELDS = ("chunk_tokens", "chunk_overlap", "fusion", "rrf_k", "dense_weight", "candidates",
                      "mmr_lambda", "use_reranker", "user_dictionary")
KB_EDITABLE_FIELDS = ("slug", "name", "description", "is_public", "embedding_model") + KB_SETTINGS_FIELDS


def _kb_validate(kb: KnowledgeBase) -> None:
    from django.core.exceptions import ValidationError

    try:
        kb.full_clean(exclude=["owner", "allowed_groups"])
    except ValidationError as exc:
        codes = {"unique": "knowledge_base_exists"}
        fields = exc.message_dict
        code = next((codes[e.code] for errors in exc.error_dict.values() for e in errors if e.code in codes),
                    "validation_error")
        raise ApplicationError(code, gettext("The knowledge base is invalid; see details."), details={"fields": fields})
    if kb.chunk_overlap >= kb.chunk_tokens:
        raise ApplicationError("validation_error", gettext("chunk_overlap must be smaller than chunk_tokens."),
                               details={"fields": {"chunk_overlap": ["must be smaller than chunk_tokens"]}})
    catalog = model_catalog()
    if kb.embedding_model not in catalog:
        raise ApplicationError("validation_error", gettext("Unknown embedding model."), details={"fields": {
            "embedding_model": [f"must be one of: {', '.join(catalog)}"]}})


def _groups_validate(group_ids: Sequence[int] | None) -> None:
    from django.contrib.auth.models import Group

    if group_ids:
        unknown = set(group_ids) - set(Group.objects.filter(pk__in=group_ids).values_list("pk", flat=True))
        if unknown:
            raise ApplicationError("unknown_group", gettext("Some allowed groups do not exist."),
                                   details={"group_ids": sorted(unknown)})


def knowledge_base_create(*, user: User, slug: str, name: str, allowed_group_ids: Sequence[int] = (),
                          editor_group_ids: Sequence[int] = (), **fields: Any) -> KnowledgeBase:
    authz.require(user, "knowledge.create")
    unknown = set(fields) - set(KB_EDITABLE_FIELDS)
    if unknown:
        raise ApplicationError("validation_error", gettext("Unknown fields: %(fields)s.")
                                                   % {"fields": ', '.join(sorted(unknown))})
    kb = KnowledgeBase(slug=slug, name=name, owner=_actor(user), **embedding_model_fields(fields, None))
    _kb_validate(kb)
    _groups_validate(allowed_group_ids)
    _groups_validate(editor_group_ids)
    with transaction.atomic():
        kb.save()
        if allowed_group_ids:
            kb.allowed_groups.set(allowed_group_ids)
        if editor_group_ids:
            kb.editor_groups.set(editor_group_ids)
    return kb


def knowledge_base_update(*, user: User, knowledge_base: KnowledgeBase, allowed_group_ids: Sequence[int] | None = None,
                          editor_group_ids: Sequence[int] | None = None, **fields: Any) -> KnowledgeBase:
    kb = knowledge_base
    authz.require(user, "knowledge.edit", kb)
    unknown = set(fields) - set(KB_EDITABLE_FIELDS)
    if unknown:
        raise ApplicationError("validation_error", gettext("Unknown fields: %(fields)s.")
                                                   % {"fields": ', '.join(sorted(unknown))})
    rechunk = any(name in fields and fields[name] != getattr(kb, name) for name in ("chunk_tokens", "chunk_overlap"))
    new_dictionary = "user_dictionary" in fields and fields["user_dictionary"] != kb.user_dictionary
    fields = embedding_model_fields(fields, kb)
    model_changed = "embedding_model" in fields and fields["embedding_model"] != kb.embedding_model
    for name, value in fields.items():
        setattr(kb, name, value)
    _kb_validate(kb)
    _groups_validate(allowed_group_ids)
    _groups_validate(editor_group_ids)
    with transaction.atomic():
        # Only the edited fields: the instance's counters (content revision, last version) may be stale.
        kb.save(update_fields=[*fields, "updated_at"])
        if allowed_group_ids is not None:
            kb.allowed_groups.set(allowed_group_ids)
        if editor_group_ids is not None:
            kb.editor_groups.set(editor_group_ids)
        if model_changed:
            knowledge_base_reembed(knowledge_base=kb)
        if fields.get("embedding_model_auto"):
            embedding_model_auto_enabled(knowledge_base=kb)
        if rechunk:
            knowledge_base_rechunk(knowledge_base=kb)
        elif new_dictionary and not model_changed:
            index_rebuild_enqueue(kb.pk)
    return kb


def embedding_model_fields(fields: dict[str, Any], kb: KnowledgeBase | None) -> dict[str, Any]:
    """`embedding_model` as given by an editor: `auto` (choose by the documents' language), a catalog key
    (explicit: the automatic choice is off for good, until an editor asks for `auto` again), or absent (a new
    base gets EMBEDDING_DEFAULT_MODEL; an update leaves the model alone)."""
    fields = dict(fields)
    if "embedding_model" not in fields:
        return fields  # the model's defaults: automatic, or EMBEDDING_DEFAULT_MODEL (`by: setting`)
    if fields["embedding_model"] == MODEL_AUTO:
        del fields["embedding_model"]
        if kb is None or not kb.embedding_model_auto:
            fields["embedding_model_auto"], fields["embedding_choice"] = True, {}
        return fields
    if kb is None or kb.embedding_model_auto or fields["embedding_model"] != kb.embedding_model:
        fields["embedding_model_auto"] = False
        fields["embedding_choice"] = {"by": BY_EDITOR, "model": fields["embedding_model"],
                                      "at": timezone.now().isoformat()}
    return fields


def knowledge_base_reembed(*, knowledge_base: KnowledgeBase) -> None:
    """After a model change: a background full build re-encodes every chunk with the new model (progress on
    its building IndexVersion) and is activated like any other; until then searches use the old version,
    and its queries the old model. Chunk boundaries are kept; a re-ingest re-chunks in the new tokens."""
    index_rebuild_enqueue(knowledge_base.pk, force=True, countdown=0)


def knowledge_base_rechunk(*, knowledge_base: KnowledgeBase) -> int:
    """After a chunk-size change: re-ingest every document (unchanged text keeps its stored vectors)."""
    ids = list(knowledge_base.documents.filter(deleted_at__isnull=True).values_list("id", flat=True))
    _enqueue_ingest(ids)
    return len(ids)


def knowledge_base_delete(*, user: User, knowledge_base: KnowledgeBase) -> None:
    """Hide the knowledge base at once (every listing and search filters on deleted_at) and remove it in a
    background task (`knowledge_base_purge`), which records its progress on the row."""
    kb = knowledge_base
    authz.require(user, "knowledge.delete", kb)
    if kb.deleted_at is not None:
        return
    with transaction.atomic():
        live = KnowledgeBase.objects.select_for_update().filter(pk=kb.pk, deleted_at__isnull=True).first()
        if live is None:
            return
        live.deleted_at = timezone.now()
        # The slug is freed at once for a new base; the old one keeps a unique placeholder until it is gone.
        live.slug = f"deleted-{live.pk}-{live.slug}"[:64]
        live.delete_progress = {"state": "queued", "documents": live.documents.count(), "removed": 0}
        live.save(update_fields=["deleted_at", "slug", "delete_progress"])  # a save: the audit log sees it
        IndexVersion.objects.filter(knowledge_base=live, status=IndexVersion.Status.ACTIVE).update(
            status=IndexVersion.Status.RETIRED, retired_at=live.deleted_at)
        transaction.on_commit(lambda: _tasks().purge_knowledge_base.delay(live.pk))
    kb.deleted_at, kb.slug = live.deleted_at, live.slug


PURGE_BATCH_DOCUMENTS = 200


def knowledge_base_purge(*, knowledge_base_id: int, on_progress: Callable[[int, int], None] | None = None) -> bool:
    """Remove a deleted knowledge base in batches of documents (chunks cascade), then its files and indexes
    and the row. Idempotent and resumable: a re-delivered task continues where the last one stopped."""
    kb = KnowledgeBase.objects.filter(pk=knowledge_base_id, deleted_at__isnull=False).first()
    if kb is None:
        return False
    total = int(kb.delete_progress.get("documents") or kb.documents.count())
    removed = int(kb.delete_progress.get("removed") or 0)
    while True:
        batch = list(kb.documents.order_by("id").values_list("id", "file")[:PURGE_BATCH_DOCUMENTS])
        if not batch:
            break
        with transaction.atomic():
            Chunk.objects.filter(document_id__in=[d for d, _ in batch]).delete()
            Document.objects.filter(pk__in=[d for d, _ in batch]).delete()
        _remove_artifacts([f for _, f in batch if f], None)
        removed += len(batch)
        KnowledgeBase.objects.filter(pk=kb.pk).update(
            delete_progress={"state": "removing", "documents": total, "removed": removed})
        if on_progress is not None:
            on_progress(removed, total)
    _remove_artifacts([], kb_index_root(kb.pk))
    kb.delete()
    return True


def _remove_artifacts(files: Iterable[str], index_root: Path | None) -> None:
    import shutil

    from django.core.files.storage import default_storage

    for name in files:
        try:
            default_storage.delete(name)
        except OSError:
            logger.warning("could not delete stored file", extra={"file": name})
    if index_root is not None:
        shutil.rmtree(index_root, ignore_errors=True)


def kb_index_root(knowledge_base_id: int) -> Path:
    return Path(settings.INDEX_ROOT) / f"kb-{knowledge_base_id}"


def kb_analyzer(knowledge_base: KnowledgeBase) -> Analyzer:
    """The BM25 analyzer of a knowledge base: the shared analyzer with its user dictionary."""
    return get_analyzer(parse_user_dictionary(knowledge_base.user_dictionary))


# ------------------------------------------------------------------------------------------
# Documents
# ------------------------------------------------------------------------------------------


@dataclass
class UploadOutcome:
    """What happened to one uploaded file; `status` is created, updated, unchanged, duplicate or rejected."""

    name: str
    status: str
    document: Document | None = None
    error_code: str = ""
    error_message: str = ""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "status": self.status,
                                "document_id": self.document.pk if self.document else None}
        if self.error_code:
            data["error"] = {"code": self.error_code, "message": self.error_message}
        return data


def _read_limited(handle: IO[bytes], limit: int) -> bytes:
    """At most limit+1 bytes: enough to know a file is too large without reading all of it."""
    chunks, total = [], 0
    while total <= limit:
        block = handle.read(min(_READ_BLOCK, limit + 1 - total))
        if not block:
            break
        chunks.append(block)
        total += len(block)
    return b"".join(chunks)


def _safe_name(name: str) -> str:
    base = PurePosixPath(name.replace("\\", "/")).name or "document"
    return get_valid_filename(base)[:150] or "document"


def _require_edit(user: User, kb: KnowledgeBase) -> None:
    authz.require(user, "knowledge.edit", kb,
                  message="Only an editor of this knowledge base may change its documents.")


def documents_upload(*, knowledge_base: KnowledgeBase, user: User, files: Sequence[File]) -> list[UploadOutcome]:
    """Store each file as a new Document and enqueue its ingestion after commit.

    Each file is judged on its own: a file over the size limit is rejected (`too_large`) without
    losing the others, and a file identical to a live document of the same knowledge base is
    reported as `duplicate` instead of being stored twice. Parse problems (type, corruption,
    encryption, emptiness) are found by ingestion and stored on the Document.
    """
    _require_edit(user, knowledge_base)
    if not files:
        raise ApplicationError("no_files", gettext("Send at least one file in the multipart field 'files'."))
    outcomes: list[UploadOutcome] = []
    with transaction.atomic():
        for upload in files:
            name = getattr(upload, "name", "") or "document"
            size = getattr(upload, "size", None)
            if size is not None and size > settings.KNOWLEDGE_MAX_UPLOAD_BYTES:
                outcomes.append(_rejected(name, size))
                continue
            upload.seek(0)
            data = _read_limited(upload, settings.KNOWLEDGE_MAX_UPLOAD_BYTES)
            if len(data) > settings.KNOWLEDGE_MAX_UPLOAD_BYTES:
                outcomes.append(_rejected(name, len(data)))
                continue
            sha = hashlib.sha256(data).hexdigest()
            existing = knowledge_base.documents.filter(sha256=sha, deleted_at__isnull=True).first()
            if existing is not None:
                outcomes.append(UploadOutcome(name, "duplicate", existing))
                continue
            document = Document(knowledge_base=knowledge_base, source_name=name[:500], sha256=sha, size_bytes=len(data),
                                created_by=_actor(user), updated_by=_actor(user))
            document.file.save(_safe_name(name), ContentFile(data), save=False)
            document.save()
            outcomes.append(UploadOutcome(name, "created", document))
        _enqueue_ingest([o.document.pk for o in outcomes if o.status == "created"])
    return outcomes


def _rejected(name: str, size: int) -> UploadOutcome:
    limit = settings.KNOWLEDGE_MAX_UPLOAD_BYTES
    return UploadOutcome(name, "rejected", error_code="too_large",
                         error_message=f"{size} bytes; the limit is {limit} bytes.")


def _actor(user: User | None) -> AbstractBaseUser | None:
    """The user to record as creator/editor; None for anonymous and the unsaved operator of commands."""
    return user if getattr(user, "is_authenticated", False) and user.pk is not None else None


def document_import(*, knowledge_base: KnowledgeBase, user: User | None, name: str, data: bytes,
                    title: str = "") -> UploadOutcome:
    """Create or update the document called `name` in the knowledge base (no task is enqueued).

    Used by the ingest command, the demo and the evaluation: re-importing the same bytes under the
    same name is `unchanged`, new bytes make a new version of the same document.
    """
    if len(data) > settings.KNOWLEDGE_MAX_UPLOAD_BYTES:
        return _rejected(name, len(data))
    sha = hashlib.sha256(data).hexdigest()
    actor = _actor(user)
    with transaction.atomic():
        document = (knowledge_base.documents.select_for_update()
                    .filter(source_name=name[:500], deleted_at__isnull=True).order_by("id").first())
        if document is not None and document.sha256 == sha and document.file:
            if title and document.title != title:
                document.title = title[:300]
                document.save(update_fields=["title"])  # a save, not an update(): the audit log sees it
            return UploadOutcome(name, "unchanged", document)
        status = "updated" if document is not None else "created"
        old_file = document.file.name if document is not None and document.file else ""
        if document is None:
            document = Document(knowledge_base=knowledge_base, source_name=name[:500], created_by=actor)
        else:
            document.version += 1
        document.title = title[:300] or document.title
        document.sha256, document.size_bytes, document.updated_by = sha, len(data), actor
        document.status, document.error_code, document.error_message = Document.Status.PENDING, "", ""
        document.file.save(_safe_name(name), ContentFile(data), save=False)
        document.save()
        if old_file:
            transaction.on_commit(lambda: _remove_artifacts([old_file], None))
    return UploadOutcome(name, status, document)


def _moved_from(document: Document) -> int | None:
    """The knowledge base a saved document is being moved out of (its stored base, when it differs)."""
    if document.pk is None:
        return None
    stored = Document.objects.filter(pk=document.pk).values_list("knowledge_base_id", flat=True).first()
    return stored if stored is not None and stored != document.knowledge_base_id else None


def _after_move(document: Document, old_kb_id: int) -> None:
    """Inside the saving transaction: both bases' contents changed, so both are re-indexed. The document is
    re-ingested with its new base's chunk settings (that rebuilds the new base); the old base is rebuilt
    without it. Until the new versions are active, retrieval's access filter hides the hit from the old base."""
    KnowledgeBase.objects.filter(pk__in=[old_kb_id, document.knowledge_base_id]).update(
        content_revision=F("content_revision") + 1)
    Document.objects.filter(pk=document.pk).update(status=Document.Status.PENDING, error_code="", error_message="")
    _enqueue_ingest([document.pk], force=True)
    index_rebuild_enqueue(old_kb_id)
    index_rebuild_enqueue(document.knowledge_base_id)


def document_rename(*, document: Document, user: User, title: str) -> Document:
    _require_edit(user, document.knowledge_base)
    document.title, document.updated_by = title[:300], _actor(user)
    document.save(update_fields=["title", "updated_by", "updated_at"])
    return document


def document_move(*, document: Document, user: User, knowledge_base: KnowledgeBase) -> Document:
    """Move a document to another knowledge base (the user must edit both); both are re-indexed."""
    old_kb = KnowledgeBase.objects.get(pk=document.knowledge_base_id)
    _require_edit(user, old_kb)
    _require_edit(user, knowledge_base)
    if document.deleted_at is not None:
        raise NotFound(gettext("No such document."), code="document_not_found")
    if knowledge_base.pk == old_kb.pk:
        return document
    with transaction.atomic():
        document.knowledge_base, document.updated_by = knowledge_base, _actor(user)
        document.save(update_fields=["knowledge_base", "updated_by", "updated_at"])  # a save: audited
        _after_move(document, old_kb.pk)
    logger.info("document moved", extra={"document_id": document.pk, "from_kb": old_kb.pk, "to_kb": knowledge_base.pk})
    return document


def document_save(*, document: Document, user: User, content_changed: bool) -> Document:
    """Save an editor's create or edit (the admin form); a content change makes a new version and is ingested.
    Changing the knowledge base moves the document: the user must edit both bases, and both are re-indexed."""
    _require_edit(user, document.knowledge_base)
    moved_from = _moved_from(document)
    if moved_from is not None:
        _require_edit(user, KnowledgeBase.objects.get(pk=moved_from))
    if not document.file and not document.source_url:
        raise ApplicationError("no_content", gettext("A document needs an uploaded file or a source URL."))
    creating = document.pk is None
    if content_changed and document.file:
        upload = document.file
        size = upload.size
        upload_size_validate(size=size, name=upload.name)
        upload.open("rb")
        upload.seek(0)
        digest = hashlib.sha256()
        for block in iter(lambda: upload.read(_READ_BLOCK), b""):
            digest.update(block)
        upload.seek(0)
        document.sha256, document.size_bytes = digest.hexdigest(), size
        if not document.source_name:
            document.source_name = _safe_name(upload.name)
    elif content_changed:
        document.sha256, document.size_bytes = "", 0
        document.source_name = document.source_name or document.source_url[:500]
    if content_changed:
        if not creating:
            document.version += 1
        document.status, document.error_code, document.error_message = Document.Status.PENDING, "", ""
    if creating:
        document.created_by = _actor(user)
    document.updated_by = _actor(user)
    with transaction.atomic():
        document.save()
        if moved_from is not None:
            _after_move(document, moved_from)
        elif content_changed:
            _enqueue_ingest([document.pk])
    return document


def document_reindex(*, documents: Iterable[Document], user: User) -> int:
    """Re-ingest documents even if unchanged (e.g. after a parser upgrade). Returns how many were queued."""
    ids = []
    for document in documents:
        _require_edit(user, document.knowledge_base)
        if document.deleted_at is None:
            ids.append(document.pk)
    with transaction.atomic():
        Document.objects.filter(pk__in=ids).update(status=Document.Status.PENDING, error_code="", error_message="")
        _enqueue_ingest(ids, force=True)
    return len(ids)


def document_delete(*, document: Document, user: User) -> None:
    """Hide the document from search at once; the delete task purges it and rebuilds the index."""
    _require_edit(user, document.knowledge_base)
    if document.deleted_at is not None:
        return
    with transaction.atomic():
        live = Document.objects.select_for_update().filter(pk=document.pk, deleted_at__isnull=True).first()
        if live is None:
            return
        live.deleted_at, live.updated_by = timezone.now(), _actor(user)
        live.save(update_fields=["deleted_at", "updated_by"])  # a save, not an update(): the audit log sees it
        transaction.on_commit(lambda: _tasks().delete_document.delay(document.pk))
    document.deleted_at = live.deleted_at


def document_purge(*, document_id: int) -> bool:
    """Remove a document deleted by an editor, its chunks and file, then rebuild its index. Idempotent;
    a live document is never purged (only `document_delete` marks one for purging)."""
    with transaction.atomic():
        document = Document.objects.select_for_update().filter(pk=document_id, deleted_at__isnull=False).first()
        if document is None:
            return False
        kb_id, file_name = document.knowledge_base_id, document.file.name if document.file else ""
        document.delete()
        KnowledgeBase.objects.filter(pk=kb_id).update(content_revision=F("content_revision") + 1)
        transaction.on_commit(lambda: _remove_artifacts([file_name] if file_name else [], None))
        index_rebuild_enqueue(kb_id)
    return True


def _tasks():
    from . import tasks

    return tasks


def _enqueue_ingest(document_ids: Sequence[int], *, force: bool = False) -> None:
    """After commit, one task per document: a worker never sees an uncommitted row."""
    ids = list(document_ids)
    if not ids:
        return

    def send() -> None:
        task = _tasks().ingest_document
        for document_id in ids:
            task.delay(document_id, force=force)

    transaction.on_commit(send)


# ------------------------------------------------------------------------------------------
# Ingestion
# ------------------------------------------------------------------------------------------


@dataclass
class IngestOutcome:
    """`status`: ready, failed, unchanged (nothing to do) or skipped (deleted or changed meanwhile)."""

    document_id: int
    knowledge_base_id: int
    status: str
    name: str = ""
    chunks: int = 0
    encoded: int = 0
    reused: int = 0
    error_code: str = ""
    error_message: str = ""

    @property
    def changed(self) -> bool:
        return self.status in ("ready", "failed")


@dataclass
class _Prepared:
    document: Document
    seen_version: int
    sha256: str
    size: int
    fingerprint: str
    data: bytes = b""
    parsed: ParsedDocument | None = None
    specs: list[ChunkSpec] = field(default_factory=list)
    error: tuple[str, str] | None = None
    mix: LanguageMix | None = None  # of the parsed text: the automatic model choice reads it


def _fingerprint(sha: str, kb: KnowledgeBase, model_id: str) -> str:
    raw = f"{PIPELINE_VERSION}|{sha}|{kb.chunk_tokens}|{kb.chunk_overlap}|{model_id}"
    return hashlib.sha256(raw.encode()).hexdigest()


def _source_filename(document: Document) -> str | None:
    if document.source_name:
        return PurePosixPath(document.source_name.replace("\\", "/")).name
    if document.file:
        return PurePosixPath(document.file.name).name
    if document.source_url:
        return PurePosixPath(urlsplit(document.source_url).path).name or None
    return None


def _document_bytes(document: Document) -> bytes:
    limit = settings.KNOWLEDGE_MAX_UPLOAD_BYTES
    if document.file:
        try:
            with document.file.open("rb") as handle:
                return _read_limited(handle, limit)
        except FileNotFoundError:
            raise DocumentSourceError("file_missing", "The uploaded file is no longer in storage; upload it again.")
    if document.source_url:
        return _fetch(document.source_url, limit)
    raise DocumentSourceError("no_content", "The document has neither a file nor a source URL.")


def _fetch(url: str, limit: int) -> bytes:
    from apps.core.outbound import OutboundError, fetch

    # Through the outbound gate: every hop's resolved address is checked, so a source URL (or a redirect)
    # cannot make the platform read its own network (metadata service, Redis, admin ports).
    try:
        response = fetch(url, timeout=settings.KNOWLEDGE_FETCH_TIMEOUT_SECONDS, max_bytes=limit,
                         headers={"User-Agent": "kotaemon-site/1.0"})
    except OutboundError as exc:
        if exc.code == "response_too_large":
            raise DocumentSourceError("too_large", f"The source URL returned more than {limit} bytes.") from exc
        if exc.transient:
            raise TransientError(f"fetching the source URL failed: {exc.code}") from exc
        raise DocumentSourceError(exc.code, f"The source URL was not fetched: {exc.message}") from exc
    if response.status >= 500 or response.status == 429:
        raise TransientError(f"{url} answered {response.status}")
    if response.status >= 400:
        raise DocumentSourceError("fetch_failed", f"The source URL answered HTTP {response.status}.")
    return response.content


def document_ingest(*, document_id: int, force: bool = False) -> IngestOutcome | None:
    """Ingest one document (the Celery task's body). Transient failures raise TransientError for a retry."""
    outcomes = documents_ingest(document_ids=[document_id], force=force, raise_transient=True)
    return outcomes[0] if outcomes else None


def documents_ingest(*, document_ids: Sequence[int], force: bool = False, rebuild: bool = True,
                     raise_transient: bool = False,
                     on_progress: Callable[[list[IngestOutcome]], None] | None = None) -> list[IngestOutcome]:
    """Parse, chunk and embed documents in batches, replacing their chunks. Never raises for bad input.

    A document whose content, chunk settings and model are unchanged since its last successful
    ingest is left alone (`unchanged`) unless `force`. Vectors are reused by (model, content hash),
    so only text never seen before is encoded, in large batches across documents. With `rebuild`,
    an index rebuild is enqueued after commit for every knowledge base that changed.
    """
    outcomes: list[IngestOutcome] = []
    ids = list(dict.fromkeys(document_ids))
    for start in range(0, len(ids), INGEST_BATCH_DOCUMENTS):
        batch = _ingest_batch(ids[start:start + INGEST_BATCH_DOCUMENTS], force, raise_transient)
        outcomes.extend(batch)
        for outcome in batch:
            documents_ingested_total.labels(outcome=outcome.status).inc()
        if on_progress is not None:
            on_progress(batch)
    if rebuild:
        for kb_id in sorted({o.knowledge_base_id for o in outcomes if o.changed}):
            index_rebuild_enqueue(kb_id)
    return outcomes


def _ingest_batch(ids: list[int], force: bool, raise_transient: bool) -> list[IngestOutcome]:
    documents = {d.pk: d for d in Document.objects.select_related("knowledge_base").filter(pk__in=ids)}
    outcomes: dict[int, IngestOutcome] = {}
    items: list[_Prepared] = []
    models: dict[str, BaseEmbedder] = {}  # each knowledge base's own model
    for document_id in ids:
        document = documents.get(document_id)
        if document is None or document.deleted_at is not None:
            continue
        key = document.knowledge_base.embedding_model
        model = models.get(key) or models.setdefault(key, embedder_for_kb(document.knowledge_base))
        item = _prepare(document, model, force, raise_transient)
        if item is None:
            outcomes[document_id] = IngestOutcome(document_id, document.knowledge_base_id, "unchanged",
                                                  name=str(document))
        else:
            items.append(item)
    Document.objects.filter(pk__in=[p.document.pk for p in items], status__in=["pending", "ready", "failed"]
                            ).update(status=Document.Status.PROCESSING)
    for item in items:
        if item.error is None:
            _parse(item)
    # The model is settled after parsing and before chunking (chunks are sized in its tokens): an automatic
    # base's first documents choose it by their language, so they are embedded once, with the right model.
    prepared: list[tuple[_Prepared, BaseEmbedder]] = []
    for kb_id in dict.fromkeys(item.document.knowledge_base_id for item in items):
        mine = [item for item in items if item.document.knowledge_base_id == kb_id]
        for item in mine:
            if item.parsed is not None:
                item.mix = language_mix(item.parsed.text)
        key = embedding_model_resolve(knowledge_base_id=kb_id, incoming=[
            (item.document.pk, item.mix) for item in mine if item.mix is not None])
        for item in mine:
            kb = item.document.knowledge_base
            kb.embedding_model = key
            model = models.get(key) or models.setdefault(key, embedder_for_kb(kb))
            item.fingerprint = _fingerprint(item.sha256, kb, model.model_id) if item.fingerprint else ""
            prepared.append((item, model))
    # The chunker measures a block, then the chunks cut from it: often the same text twice.
    counters = {id(model): functools.lru_cache(maxsize=16384)(model.count_tokens) for model in models.values()}
    for item, model in prepared:
        if item.error is None:
            _chunk(item, counters[id(model)])

    # One encode per model over all its documents' chunks: large batches, each text encoded once.
    item_vectors: dict[int, Any] = {}
    new_hashes: dict[int, set[str]] = {}
    for model in models.values():
        items = [item for item, m in prepared if m is model]
        specs = [spec for item in items for spec in item.specs]
        vectors, encoded_hashes = vectors_for([indexed_text(s.text, s.context) for s in specs],
                                              [s.content_hash for s in specs], model=model)
        offset, counted = 0, set()
        for item in items:
            item_vectors[id(item)] = vectors[offset:offset + len(item.specs)]
            offset += len(item.specs)
            new_hashes[id(item)] = {s.content_hash for s in item.specs} & (encoded_hashes - counted)
            counted |= new_hashes[id(item)]
    with transaction.atomic():
        for item, model in prepared:
            outcomes[item.document.pk] = _write(item, item_vectors[id(item)], model.model_id,
                                                len(new_hashes[id(item)]))
    return [outcomes[i] for i in ids if i in outcomes]


def _prepare(document: Document, model, force: bool, raise_transient: bool) -> _Prepared | None:
    kb = document.knowledge_base
    try:
        data = _document_bytes(document)
    except TransientError as exc:
        if raise_transient:
            raise
        return _Prepared(document, document.version, document.sha256, 0, "", error=("fetch_failed", str(exc)))
    except DocumentSourceError as exc:
        return _Prepared(document, document.version, document.sha256, 0, "", error=(exc.code, exc.message))
    sha = hashlib.sha256(data).hexdigest()
    fingerprint = _fingerprint(sha, kb, model.model_id)
    if not force and document.status == Document.Status.READY and document.ingest_fingerprint == fingerprint:
        return None
    return _Prepared(document, document.version, sha, len(data), fingerprint, data=data)


def _parse(item: _Prepared) -> None:
    try:
        item.parsed = parse(item.data, filename=_source_filename(item.document), limits=parse_limits())
    except IngestError as exc:
        item.parsed, item.error = None, (exc.code, exc.message)
    item.data = b""  # the bytes can be large; only the parsed text is kept


def _chunk(item: _Prepared, count_tokens: Callable[[str], int]) -> None:
    kb = item.document.knowledge_base
    try:
        item.specs = chunk_document(item.parsed, count_tokens=count_tokens, chunk_tokens=kb.chunk_tokens,
                                    overlap_tokens=kb.chunk_overlap, title=item.document.title or None)
    except IngestError as exc:
        item.parsed, item.error = None, (exc.code, exc.message)


def _write(item: _Prepared, vectors, model_id: str, encoded: int) -> IngestOutcome:
    """Replace the document's chunks, unless it was deleted or re-uploaded while we worked.

    The check is a conditional UPDATE, the transaction's first write: it locks the row (and SQLite's
    database) before anything is read, so a concurrent upload or delete either lands before (and this
    write is skipped) or waits until commit."""
    kb_id = item.document.knowledge_base_id
    name = str(item.document)
    now = timezone.now()
    current = Document.objects.filter(pk=item.document.pk, deleted_at__isnull=True, version=item.seen_version)
    if not current.update(ingested_at=now):
        return IngestOutcome(item.document.pk, kb_id, "skipped", name=name)
    document = Document.objects.get(pk=item.document.pk)
    superseded = Chunk.objects.filter(document=document, superseded_at__isnull=True).update(superseded_at=now)
    document.sha256, document.ingested_at = item.sha256, now
    document.size_bytes = item.size or document.size_bytes
    if item.error is not None:
        code, message = item.error
        document.status, document.error_code, document.error_message = Document.Status.FAILED, code, message[:2000]
        document.text, document.ingest_fingerprint, document.page_count = "", "", None
        document.save()
        if superseded:
            KnowledgeBase.objects.filter(pk=kb_id).update(content_revision=F("content_revision") + 1)
        return IngestOutcome(document.pk, kb_id, "failed", name=name, error_code=code, error_message=message)
    parsed: ParsedDocument = item.parsed  # type: ignore[assignment]
    Chunk.objects.bulk_create([
        Chunk(document=document, position=spec.position, text=spec.text, page=spec.page,
              heading_path=list(spec.heading_path), char_start=spec.char_start, char_end=spec.char_end,
              token_count=spec.token_count, content_hash=spec.content_hash, search_context=spec.context,
              embedding=vector_to_bytes(vector),
              embedding_model=model_id)
        for spec, vector in zip(item.specs, vectors)
    ], batch_size=500)
    document.status, document.error_code, document.error_message = Document.Status.READY, "", ""
    document.ingest_attempts = 0
    document.text, document.detected_type, document.page_count = parsed.text, parsed.type, parsed.page_count
    mix = item.mix or language_mix(parsed.text)
    document.lang_tokens, document.lang_cjk_tokens = mix.tokens, mix.cjk
    document.ingest_fingerprint = item.fingerprint
    if not document.title:
        document.title = (parsed.title or name)[:300]
    document.save()
    KnowledgeBase.objects.filter(pk=kb_id).update(content_revision=F("content_revision") + 1)
    return IngestOutcome(document.pk, kb_id, "ready", name=document.title or name, chunks=len(item.specs),
                         encoded=encoded, reused=len(item.specs) - encoded)


def document_mark_failed(*, document_id: int, code: str, message: str) -> None:
    """Last resort when a task gives up: the editor sees why instead of a document stuck in processing."""
    Document.objects.filter(pk=document_id, status__in=["pending", "processing"]).update(
        status=Document.Status.FAILED, error_code=code, error_message=message[:2000])


# ------------------------------------------------------------------------------------------
# Index versions
# ------------------------------------------------------------------------------------------


@dataclass
class IndexBuildResult:
    """`status`: built (and active), unchanged, superseded (a newer version was already active), missing,
    deferred (documents are still being ingested; the last one triggers the build) or queued (another build
    of this base is running and will go round once more)."""

    knowledge_base_id: int
    status: str
    version: int | None = None
    chunk_count: int = 0
    document_count: int = 0
    encoded: int = 0
    seconds: float = 0.0
    kind: str = ""  # full, incremental or merge
    written: int = 0  # chunks written into new segments
    tombstoned: int = 0


def index_rebuild_enqueue(knowledge_base_id: int, *, force: bool = False, countdown: float | None = None) -> None:
    """After commit, a short delay lets a burst of ingests coalesce into one build (the rest no-op)."""
    delay = settings.KNOWLEDGE_REBUILD_DELAY_SECONDS if countdown is None else countdown
    transaction.on_commit(lambda: _tasks().rebuild_index.apply_async(
        args=[knowledge_base_id], kwargs={"force": force}, countdown=delay))


def index_rebuild(*, knowledge_base_id: int, force: bool = False,
                  on_progress: Callable[[int], None] | None = None) -> IndexBuildResult:
    """Bring the knowledge base's index up to date with its documents and activate it. Idempotent.

    Incremental: a new version reuses the active version's segments, tombstones the chunks of
    documents that changed or went away, and writes one new segment with the changed documents'
    chunks (plus, when `plan_merge` says so, one merged segment); only those chunks are read from
    the database. `force` writes every chunk anew (a full build). Without `force`, nothing is done
    when every document is as the active version saw it, and while documents of the base are still
    being ingested the build waits (`deferred`, see `_rebuild_deferred`): a bulk upload of any size
    builds at most KNOWLEDGE_BULK_MAX_VERSIONS versions. One build per knowledge base runs at a time
    in the cluster; a request arriving meanwhile makes the running build go round once more, unless
    the burst it belongs to is still being ingested (its last document asks again).
    """
    kb = KnowledgeBase.objects.filter(pk=knowledge_base_id, deleted_at__isnull=True).first()
    if kb is None:
        return IndexBuildResult(knowledge_base_id, "missing")
    if not force and _rebuild_deferred(kb):
        return IndexBuildResult(kb.pk, "deferred")
    lock = _BuildLock(kb.pk)
    # Ask first, then try to build: a holder looks at the flag after letting go of the lock, so a request
    # whose acquire fails is always seen by the holder (or by whoever takes the lock next).
    lock.mark_dirty()
    if not lock.acquire():
        return IndexBuildResult(kb.pk, "queued")
    built = None
    try:
        while True:
            lock.clear_dirty()
            result = _index_build(kb.pk, force=force, on_progress=on_progress)
            built = result if result.status == "built" or built is None else built
            force = False
            if not lock.dirty():
                lock.release()
                if not lock.dirty() or not lock.acquire():
                    return built
            if _rebuild_deferred(kb):  # a burst still being ingested: its last document asks again
                lock.clear_dirty()
                return built
    finally:
        lock.release()


class _BuildLock:
    """At most one build per knowledge base in the cluster (a cache key with a timeout, so a worker that
    dies holding it only delays the next build until the task time limit)."""

    def __init__(self, kb_id: int) -> None:
        self.key = f"knowledge:build-lock:{kb_id}"
        self.dirty_key = f"knowledge:build-dirty:{kb_id}"
        self.token = f"{settings.INSTANCE_ID}:{time.monotonic_ns()}"

    def acquire(self) -> bool:
        from django.core.cache import cache

        try:
            return bool(cache.add(self.key, self.token, timeout=int(settings.CELERY_TASK_TIME_LIMIT)))
        except Exception:  # no cache: builds still serialise on the version counter, just not coalesced
            logger.warning("index build lock unavailable", exc_info=True)
            return True

    def release(self) -> None:
        from django.core.cache import cache

        try:
            if cache.get(self.key) == self.token:
                cache.delete(self.key)
        except Exception:
            logger.warning("index build lock release failed", exc_info=True)

    def mark_dirty(self) -> None:
        from django.core.cache import cache

        try:
            cache.set(self.dirty_key, 1, timeout=int(settings.CELERY_TASK_TIME_LIMIT))
        except Exception:
            logger.warning("index build dirty flag failed", exc_info=True)

    def dirty(self) -> bool:
        from django.core.cache import cache

        try:
            return bool(cache.get(self.dirty_key))
        except Exception:
            return False

    def clear_dirty(self) -> None:
        from django.core.cache import cache

        try:
            cache.delete(self.dirty_key)
        except Exception:
            pass


def _rebuild_deferred(kb: KnowledgeBase, *, now=None) -> bool:
    """Whether a build of `kb` waits because documents of the base are still being ingested.

    A burst lasts while documents of the base are pending or processing; it started at the oldest such
    document's last change (the upload). While it makes progress (a document of the base finished less
    than KNOWLEDGE_REBUILD_MAX_WAIT_SECONDS ago), versions are built during it only while fewer than
    KNOWLEDGE_BULK_MAX_VERSIONS - 1 were, no build is in flight, and the newest version (or the burst's
    start) is older than the wait times 2**(versions built in the burst); the finish of its last document
    builds the final one. So a bulk upload makes at most KNOWLEDGE_BULK_MAX_VERSIONS versions whatever its
    size and the machine's speed, and documents already ingested become searchable during a long one.
    When ingestion stalls (no document of the base finished for KNOWLEDGE_REBUILD_STALL_SECONDS: a lost
    task, a stuck or a very long document) the build is not deferred, so a stuck document hides the others
    that long at most (one extra version per stall). A stream of separate uploads that never lets the base go idle gets at
    most one version per wait. With a real broker a check is scheduled for when a deferred build is due,
    so a burst whose last document never finishes is built all the same."""
    from django.db.models import Max, Min

    wait = settings.KNOWLEDGE_REBUILD_MAX_WAIT_SECONDS
    if wait <= 0:
        return False
    now = now or timezone.now()
    documents = Document.objects.filter(knowledge_base=kb, deleted_at__isnull=True)
    started = documents.filter(status__in=[Document.Status.PENDING, Document.Status.PROCESSING]).aggregate(
        at=Min("updated_at"))["at"]
    if started is None:
        return False
    finished = documents.aggregate(at=Max("ingested_at"))["at"]
    stalls_at = max(started, finished or started) + timedelta(seconds=settings.KNOWLEDGE_REBUILD_STALL_SECONDS)
    if now >= stalls_at:
        return False
    versions = IndexVersion.objects.filter(knowledge_base=kb)
    in_burst = versions.filter(created_at__gte=started).count()
    newest = versions.aggregate(at=Max("created_at"))["at"]
    in_flight = versions.filter(status=IndexVersion.Status.BUILDING,
                                created_at__gte=now - timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT)).exists()
    due = None
    if in_burst < settings.KNOWLEDGE_BULK_MAX_VERSIONS - 1:
        due = max(started, newest or started) + timedelta(seconds=wait * 2 ** in_burst)
        if now >= due and not in_flight:
            return False
    _schedule_deferred_check(kb.pk, min(t for t in (due, stalls_at) if t is not None) - now)
    return True


def _schedule_deferred_check(kb_id: int, delay: timedelta) -> None:
    """With a real broker, one delayed build request per base at a time (eager tasks cannot wait)."""
    from django.core.cache import cache

    from kotaemon_site.celery import app

    if app.conf.task_always_eager:
        return
    seconds = max(1.0, delay.total_seconds())
    try:
        first = cache.add(f"knowledge:build-deferred:{kb_id}", 1, timeout=max(1, int(seconds)))
    except Exception:
        first = True
    if first:
        _tasks().rebuild_index.apply_async(args=[kb_id], countdown=seconds + 0.5)


_BUILD_BATCH = 4096


def _stamp(value) -> int:
    return int(value.timestamp() * 1_000_000) if value is not None else 0


def _index_build(kb_id: int, *, force: bool, on_progress: Callable[[int], None] | None) -> IndexBuildResult:
    import numpy as np

    from .rag.errors import IndexLoadError
    from .rag.index import ViewLayout, ViewSegment, plan_merge, write_segment, write_view

    kb = KnowledgeBase.objects.get(pk=kb_id)
    model = embedder_for_kb(kb)  # read once: the whole version is built with this one model
    analyzer = kb_analyzer(kb)
    revision = kb.content_revision
    active = IndexVersion.objects.filter(knowledge_base=kb, status=IndexVersion.Status.ACTIVE).first()
    parent = None
    if not force and active is not None and active.embedding_model == model.model_id:
        try:
            parent = ViewLayout.read(active.artifact_path)
        except IndexLoadError:
            parent = None  # missing or of an older format: build everything anew
        # Another analyzer (an upgrade, a new user dictionary) tokenizes differently: every segment anew.
        if parent is not None and not manifest_analyzer_matches(parent.manifest, analyzer):
            parent = None
    docs = list(Document.objects.filter(knowledge_base_id=kb_id).values_list("id", "status", "deleted_at",
                                                                             "ingested_at"))
    live = {doc_id: _stamp(at) for doc_id, status, deleted, at in docs
            if status == Document.Status.READY and deleted is None}
    seen: dict[int, int] = {}
    if parent is not None:
        doc_ids, stamps = parent.array("doc_ids"), parent.array("doc_stamps")
        if doc_ids is None or stamps is None:
            parent = None
        else:
            seen = dict(zip(doc_ids.tolist(), stamps.tolist()))
    changed = sorted(d for d, stamp in live.items() if seen.get(d) != stamp)
    gone = sorted(d for d in seen if d not in live)
    stale = np.asarray(sorted(set(changed) | set(gone)), dtype=np.int64)

    # Tombstones: the chunks of changed and vanished documents, in every segment they are in.
    kept: list[dict] = []
    tombstoned = 0
    if parent is not None:
        for segment in parent.segments:
            tombs = np.asarray(segment["tombstones"], dtype=np.int64)
            if len(stale):
                hit = np.isin(np.asarray(segment["doc_ids"]), stale)
                if hit.any():
                    tombs = np.union1d(tombs, np.asarray(segment["ids"])[hit])
            tombstoned += len(tombs) - len(segment["tombstones"])
            if len(tombs) < segment["count"]:  # a fully tombstoned segment is simply dropped
                kept.append({"name": segment["name"], "count": segment["count"], "tombstones": tombs,
                             "ids": segment["ids"]})
    merge = plan_merge([{"name": s["name"], "count": s["count"], "tombstones": len(s["tombstones"])}
                        for s in kept]) if parent is not None else []
    if parent is not None and not changed and not gone and not merge:
        if active.source_revision != revision:
            IndexVersion.objects.filter(pk=active.pk).update(source_revision=revision)
        return IndexBuildResult(kb.pk, "unchanged", active.version, active.chunk_count, active.document_count)

    started = time.perf_counter()
    with transaction.atomic():
        # The increment is the first statement: it takes the row lock (PostgreSQL) or the write lock
        # (SQLite) before anything is read, so concurrent rebuilds queue here and get distinct numbers.
        KnowledgeBase.objects.filter(pk=kb.pk).update(last_index_version=F("last_index_version") + 1)
        kb = KnowledgeBase.objects.get(pk=kb.pk)
        described = {**model.describe(), "model": model.model_key or kb.embedding_model}
        version = IndexVersion.objects.create(
            knowledge_base=kb, version=kb.last_index_version, source_revision=revision,
            embedding_model=model.model_id, embedding_key=described["model"], embedding_backend=model.backend,
            embedding_dimension=model.dimension,
            # what this build must encode (all of it after a model change): the progress shown in the admin
            encode_total=_chunks_to_encode(kb.pk, model) if parent is None else 0)
    counters = {"encoded": 0, "written": 0, "version": version.pk}
    root = kb_index_root(kb.pk)
    options = {"dim": model.dim, "hnsw_threshold": settings.KNOWLEDGE_HNSW_THRESHOLD,
               "compression": settings.KNOWLEDGE_DENSE_COMPRESSION, "analyzer": analyzer}

    def progress(n: int) -> None:
        counters["written"] += n
        if on_progress is not None:
            on_progress(n)

    try:
        changed_set = set(changed)
        stamps = {d: stamp for d, stamp in seen.items() if d in live and d not in changed_set}
        segments: list[ViewSegment] = []
        if merge:
            group = [s for s in kept if s["name"] in merge]
            ids = np.concatenate([np.asarray(s["ids"])[~np.isin(np.asarray(s["ids"]), s["tombstones"])]
                                  for s in group])
            merged = write_segment(root, f"s{version.version:06d}m", _chunk_batches_by_ids(np.sort(ids), model,
                                   counters), expected=len(ids), on_batch=progress, **options)
        for segment in kept:
            if segment["name"] in merge:
                if segment["name"] == merge[0]:
                    segments.append(ViewSegment(merged["name"]))
                continue
            segments.append(ViewSegment(segment["name"], segment["tombstones"]))
        if changed:
            expected = Chunk.objects.filter(document_id__in=changed, superseded_at__isnull=True).count()
            fresh = write_segment(root, f"s{version.version:06d}",
                                  _chunk_batches_by_documents(changed, model, counters, stamps),
                                  expected=expected, on_batch=progress, **options)
            if fresh["count"]:
                segments.append(ViewSegment(fresh["name"]))
        for doc_id in changed:  # ready documents without chunks (nothing indexable) are seen all the same
            stamps.setdefault(doc_id, live[doc_id])
        doc_ids = np.asarray(sorted(stamps), dtype=np.int64)
        path = write_view(
            root, version.version, segments,
            meta={"model_id": model.model_id, "embedding": described, "knowledge_base": kb.pk, "slug": kb.slug,
                  "source_revision": revision, "build_kind": _build_kind(parent, merge)},
            arrays={"doc_ids": doc_ids, "doc_stamps": np.asarray([stamps[d] for d in doc_ids.tolist()],
                                                                 dtype=np.int64)},
            dim=model.dim, fields={**analyzer_manifest(analyzer), **embedding_manifest({"embedding": described},
                                                                                       model.dimension)},
        )
        manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
        version.artifact_path, version.dense_kind = str(path), manifest.get("dense_kind", "")
        version.chunk_count, version.document_count = int(manifest["count"]), len(doc_ids)
        version.encoded_count, version.written_count = counters["encoded"], counters["written"]
        version.segment_count = len(manifest["segments"])
        version.tombstone_count = sum(e["tombstones"] for e in manifest["segments"])
        version.build_kind = _build_kind(parent, merge)
        version.build_seconds = time.perf_counter() - started
        activated = _index_activate(version)
    except Exception as exc:
        IndexVersion.objects.filter(pk=version.pk).update(status=IndexVersion.Status.FAILED,
                                                          error_message=f"{type(exc).__name__}: {exc}"[:2000])
        index_builds_total.labels(outcome="failed").inc()
        raise
    seconds = time.perf_counter() - started
    index_build_seconds.observe(seconds)
    index_builds_total.labels(outcome="built" if activated else "superseded").inc()
    index_versions_cleanup(knowledge_base_id=kb.pk)
    return IndexBuildResult(kb.pk, "built" if activated else "superseded", version.version, version.chunk_count,
                            version.document_count, counters["encoded"], seconds, kind=version.build_kind,
                            written=counters["written"], tombstoned=tombstoned)


def _build_kind(parent, merge) -> str:
    return "full" if parent is None else ("merge" if merge else "incremental")


def _chunk_batches_by_documents(document_ids: Sequence[int], model, counters: dict, stamps: dict[int, int]):
    """Live chunks of ready documents, in id order, as SegmentBatch streams of at most _BUILD_BATCH rows.
    Each document's stamp is read in the same statement as its chunks, so a document re-ingested while
    this runs is recorded as of the chunks taken (and redone by the next build)."""
    for start in range(0, len(document_ids), 500):
        rows = (Chunk.objects.filter(document_id__in=document_ids[start:start + 500], superseded_at__isnull=True,
                                     document__status=Document.Status.READY, document__deleted_at__isnull=True)
                .order_by("id").values_list("id", "document_id", "text", "content_hash", "embedding",
                                            "embedding_model", "document__ingested_at", "search_context"))
        yield from _batches(rows.iterator(chunk_size=2000), model, counters, stamps)


def _chunk_batches_by_ids(ids, model, counters: dict):
    for start in range(0, len(ids), _BUILD_BATCH):
        part = [int(i) for i in ids[start:start + _BUILD_BATCH]]
        rows = (Chunk.objects.filter(pk__in=part).order_by("id")
                .values_list("id", "document_id", "text", "content_hash", "embedding", "embedding_model",
                             "document__ingested_at", "search_context"))
        yield from _batches(rows.iterator(chunk_size=2000), model, counters, None)


def _batches(rows, model, counters: dict, stamps: dict[int, int] | None):
    buffer: list = []
    for row in rows:
        buffer.append(row)
        if stamps is not None:
            stamps[row[1]] = _stamp(row[6])
        if len(buffer) >= _BUILD_BATCH:
            yield _segment_batch(buffer, model, counters)
            buffer = []
    if buffer:
        yield _segment_batch(buffer, model, counters)


def _segment_batch(rows: list, model, counters: dict):
    """Vectors come from storage; a chunk stored under another model (the model was changed) is re-encoded
    once and its new vector stored, reusing any vector already known for its text."""
    import numpy as np

    from .rag.index import SegmentBatch

    vectors = np.zeros((len(rows), model.dim), dtype=np.float32)
    stale: list[int] = []
    for index, row in enumerate(rows):
        if row[4] is not None and row[5] == model.model_id:
            vectors[index] = vector_from_bytes(row[4])
        else:
            stale.append(index)
    # Encoded in small batches, each stored as it finishes: the building version shows progress, and a
    # redelivered task resumes where a crashed one stopped (stored vectors are reused by content hash).
    for start in range(0, len(stale), REEMBED_BATCH):
        part = stale[start:start + REEMBED_BATCH]
        # What is embedded, and its cache key, as at ingestion (chunks stored before the context was
        # embedded carry a hash of their text alone: recomputed, so the cache never mixes the two).
        texts = [indexed_text(rows[i][2], rows[i][7]) for i in part]
        hashes = [content_hash(text) for text in texts]
        fresh, encoded_hashes = vectors_for(texts, hashes, model=model)
        counters["encoded"] += len(encoded_hashes)
        vectors[part] = fresh
        updates = [Chunk(pk=rows[i][0], embedding=vector_to_bytes(fresh[n]), embedding_model=model.model_id,
                         content_hash=hashes[n]) for n, i in enumerate(part)]
        Chunk.objects.bulk_update(updates, ["embedding", "embedding_model", "content_hash"], batch_size=500)
        if counters.get("version"):
            IndexVersion.objects.filter(pk=counters["version"]).update(encoded_count=counters["encoded"])
    return SegmentBatch(np.asarray([r[0] for r in rows], dtype=np.int64),
                        np.asarray([r[1] for r in rows], dtype=np.int64), vectors,
                        [indexed_text(r[2], r[7]) for r in rows])  # BM25's input: context + text


REEMBED_BATCH = 256


def _chunks_to_encode(kb_id: int, model: BaseEmbedder) -> int:
    """Live chunks of ready documents whose stored vector is not `model`'s."""
    return (Chunk.objects.filter(document__knowledge_base_id=kb_id, document__status=Document.Status.READY,
                                 document__deleted_at__isnull=True, superseded_at__isnull=True)
            .exclude(embedding_model=model.model_id, embedding__isnull=False).count())


def _lock_knowledge_base(knowledge_base_id: int) -> None:
    """Serialise writers of one knowledge base until commit. A no-op UPDATE rather than SELECT ... FOR
    UPDATE, because SQLite ignores FOR UPDATE and fails at once ("database is locked") when a transaction
    that began by reading tries to write while another one writes; beginning with a write makes it wait."""
    KnowledgeBase.objects.filter(pk=knowledge_base_id).update(last_index_version=F("last_index_version"))


def _index_activate(version: IndexVersion) -> bool:
    """Make `version` the active one in one transaction; False if a newer version is already active."""
    with transaction.atomic():
        _lock_knowledge_base(version.knowledge_base_id)
        kb = KnowledgeBase.objects.get(pk=version.knowledge_base_id)
        current = IndexVersion.objects.filter(knowledge_base=kb, status=IndexVersion.Status.ACTIVE).first()
        now = timezone.now()
        if current is not None and current.version > version.version:
            version.status, version.retired_at = IndexVersion.Status.RETIRED, now
            version.save()
            return False
        if current is not None:
            current.status, current.retired_at = IndexVersion.Status.RETIRED, now
            current.save(update_fields=["status", "retired_at"])
        version.status, version.activated_at = IndexVersion.Status.ACTIVE, now
        version.save()
        publish_on_commit("knowledge_updated", {"knowledge_base": kb.pk, "slug": kb.slug, "version": version.version},
                          version=version.version)
    return True


def index_versions_cleanup(*, knowledge_base_id: int | None = None, now=None) -> int:
    """Delete what no instance can still be serving: retired versions and superseded chunks older than the
    grace period, failed builds, and temporary directories of crashed writers. Returns versions removed."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.KNOWLEDGE_INDEX_GRACE_SECONDS)
    versions = IndexVersion.objects.filter(artifact_removed_at__isnull=True)
    if knowledge_base_id is not None:
        versions = versions.filter(knowledge_base_id=knowledge_base_id)
    # A build that outlived the task time limit died with its worker.
    stuck_before = now - timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT)
    versions.filter(status=IndexVersion.Status.BUILDING, created_at__lt=stuck_before).update(
        status=IndexVersion.Status.FAILED, error_message="The build did not finish (worker lost).")
    removed = 0
    for version in versions.filter(status__in=[IndexVersion.Status.RETIRED, IndexVersion.Status.FAILED]):
        if version.status == IndexVersion.Status.RETIRED and (version.retired_at is None or version.retired_at > cutoff):
            continue
        delete_version(kb_index_root(version.knowledge_base_id), version.version)
        IndexVersion.objects.filter(pk=version.pk).update(artifact_removed_at=now)
        removed += 1
    # A superseded chunk is only in versions built before it was superseded; once a later version has
    # been active for the grace period, every instance has moved past them.
    actives = IndexVersion.objects.filter(status=IndexVersion.Status.ACTIVE, activated_at__lt=cutoff)
    if knowledge_base_id is not None:
        actives = actives.filter(knowledge_base_id=knowledge_base_id)
    for active in actives:
        Chunk.objects.filter(document__knowledge_base_id=active.knowledge_base_id,
                             superseded_at__lt=active.created_at).delete()
        root = kb_index_root(active.knowledge_base_id)
        remove_stale_tmp(root, older_than_s=float(settings.CELERY_TASK_TIME_LIMIT))
    # Segments outlive the versions that wrote them while a later version still names them; a segment no
    # version names is removed once it is older than a build can take (a running build's new segment is
    # named by no version until its last step).
    kb_ids = {knowledge_base_id} if knowledge_base_id is not None else set(
        IndexVersion.objects.values_list("knowledge_base_id", flat=True).distinct())
    for kb_id in kb_ids:
        root = kb_index_root(kb_id)
        delete_unreferenced_segments(root, referenced_segments(root),
                                     older_than_s=float(settings.CELERY_TASK_TIME_LIMIT))
    return removed


@dataclass
class SweepReport:
    requeued: list[int] = field(default_factory=list)
    parked: list[int] = field(default_factory=list)
    rebuilds: list[int] = field(default_factory=list)
    purges: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[int]]:
        return {"requeued": self.requeued, "parked": self.parked, "rebuilds": self.rebuilds, "purges": self.purges}


def knowledge_sweep(*, now=None) -> SweepReport:
    """The periodic healer (Celery beat, KNOWLEDGE_SWEEP_SECONDS). Re-enqueues documents stuck pending or
    processing longer than KNOWLEDGE_INGEST_STUCK_SECONDS (a lost enqueue, a worker killed mid-ingest) and
    parks one as failed after KNOWLEDGE_INGEST_MAX_ATTEMPTS; asks for a build of every base whose active
    version is behind its documents (or that has ready documents and no version); resumes purges of
    deleted knowledge bases that stopped. Every action is idempotent, so overlapping sweeps are harmless."""
    from .metrics import documents_swept_total

    now = now or timezone.now()
    report = SweepReport()
    stuck_before = now - timedelta(seconds=settings.KNOWLEDGE_INGEST_STUCK_SECONDS)
    stuck = (Document.objects.filter(deleted_at__isnull=True, knowledge_base__deleted_at__isnull=True,
                                     status__in=[Document.Status.PENDING, Document.Status.PROCESSING],
                                     updated_at__lt=stuck_before)
             .values_list("id", "status", "ingest_attempts", "error_message"))
    for doc_id, status, attempts, error in stuck:
        if attempts >= settings.KNOWLEDGE_INGEST_MAX_ATTEMPTS:
            message = (f"Parked after {attempts} attempts: ingestion never finished (last state: {status})."
                       + (f" Last error: {error}" if error else ""))
            Document.objects.filter(pk=doc_id, status=status).update(
                status=Document.Status.FAILED, error_code="ingest_stuck", error_message=message[:2000],
                updated_at=now)
            report.parked.append(doc_id)
            documents_swept_total.labels(action="parked").inc()
        elif Document.objects.filter(pk=doc_id, status=status, ingest_attempts=attempts).update(
                ingest_attempts=attempts + 1, status=Document.Status.PENDING, updated_at=now):
            report.requeued.append(doc_id)
            documents_swept_total.labels(action="requeued").inc()
    _enqueue_ingest(report.requeued)
    if report.parked:
        kb_ids = set(Document.objects.filter(pk__in=report.parked).values_list("knowledge_base_id", flat=True))
        for kb_id in sorted(kb_ids):
            index_rebuild_enqueue(kb_id)
    active = IndexVersion.objects.filter(knowledge_base=OuterRef("pk"), status=IndexVersion.Status.ACTIVE)
    building = IndexVersion.objects.filter(knowledge_base=OuterRef("pk"), status=IndexVersion.Status.BUILDING,
                                           created_at__gte=now - timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT))
    behind = (KnowledgeBase.objects.filter(deleted_at__isnull=True)
              .annotate(active_revision=Subquery(active.values("source_revision")[:1]), busy=Exists(building),
                        has_ready=Exists(Document.objects.filter(knowledge_base=OuterRef("pk"), deleted_at__isnull=True,
                                                                 status=Document.Status.READY)))
              .filter(busy=False)
              .filter(Q(active_revision__lt=F("content_revision")) | Q(active_revision__isnull=True, has_ready=True)))
    for kb_id in behind.values_list("id", flat=True):
        if kb_id not in report.rebuilds:
            report.rebuilds.append(kb_id)
            index_rebuild_enqueue(kb_id, countdown=0)
    abandoned = KnowledgeBase.objects.filter(
        deleted_at__lt=now - timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT)).values_list("id", flat=True)
    for kb_id in abandoned:
        report.purges.append(kb_id)
        transaction.on_commit(lambda kb_id=kb_id: _tasks().purge_knowledge_base.delay(kb_id))
    return report


@dataclass
class FilesIngestReport:
    outcomes: list[IngestOutcome]
    build: IndexBuildResult | None
    seconds: float

    @property
    def encoded(self) -> int:
        return sum(o.encoded for o in self.outcomes)

    @property
    def reused(self) -> int:
        return sum(o.reused for o in self.outcomes)

    def counts(self) -> dict[str, int]:
        counts = {status: 0 for status in ("ready", "unchanged", "failed", "rejected", "skipped")}
        for outcome in self.outcomes:
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
        return counts


def files_ingest(*, knowledge_base: KnowledgeBase, files: Sequence[tuple[str, Path]], user: User | None = None,
                 force: bool = False, on_progress: Callable[[int], None] | None = None) -> FilesIngestReport:
    """Import files (by source name), ingest them synchronously and rebuild the index once.

    Never aborts the batch: an unreadable or oversized file becomes a `rejected` outcome, a file
    that cannot be parsed a `failed` one with its error code.
    """
    started = time.perf_counter()
    outcomes: list[IngestOutcome] = []
    document_ids: list[int] = []
    for name, path in files:
        try:
            if path.stat().st_size > settings.KNOWLEDGE_MAX_UPLOAD_BYTES:
                upload = _rejected(name, path.stat().st_size)
            else:
                upload = document_import(knowledge_base=knowledge_base, user=user, name=name, data=path.read_bytes())
        except OSError as exc:
            upload = UploadOutcome(name, "rejected", error_code="unreadable", error_message=exc.strerror or str(exc))
        if upload.document is None:
            outcomes.append(IngestOutcome(0, knowledge_base.pk, "rejected", name=name, error_code=upload.error_code,
                                          error_message=upload.error_message))
            if on_progress is not None:
                on_progress(1)
        else:
            document_ids.append(upload.document.pk)
    outcomes += documents_ingest(document_ids=document_ids, force=force, rebuild=False,
                                 on_progress=lambda batch: on_progress(len(batch)) if on_progress else None)
    build = index_rebuild(knowledge_base_id=knowledge_base.pk)
    return FilesIngestReport(outcomes, build, time.perf_counter() - started)


# ------------------------------------------------------------------------------------------
# Demo knowledge base
# ------------------------------------------------------------------------------------------

DEMO_DATA_DIR = Path(__file__).resolve().parent / "demo_data"
DEMO_SLUG = "handbook"


def demo_knowledge_load(*, owner: AbstractBaseUser, stdout=None) -> dict[str, int]:
    """Create (once) the public "handbook" knowledge base from demo_data/ and ingest it synchronously.

    Idempotent: unchanged files are neither re-imported nor re-encoded, and the index is rebuilt
    only when something changed.
    """
    kb, created = KnowledgeBase.objects.get_or_create(
        slug=DEMO_SLUG,
        defaults={"name": "Company handbook & user guide", "owner": owner, "is_public": True,
                  "description": "Sample knowledge: policies of the fictional Northwind Outfitters and the "
                                 "kotaemon-site user guide. Public: every user can search it."},
    )
    counts = {"created": 0, "updated": 0, "unchanged": 0, "rejected": 0}
    document_ids = []
    for path in sorted(p for p in DEMO_DATA_DIR.iterdir() if p.is_file() and not p.name.startswith((".", "_"))):
        outcome = document_import(knowledge_base=kb, user=owner, name=path.name, data=path.read_bytes())
        counts[outcome.status] += 1
        if outcome.document is not None:
            document_ids.append(outcome.document.pk)
    results = documents_ingest(document_ids=document_ids, rebuild=False)
    build = index_rebuild(knowledge_base_id=kb.pk)
    failed = [r for r in results if r.status == "failed"]
    summary = {**counts, "ingested": sum(r.status == "ready" for r in results), "failed": len(failed),
               "encoded": sum(r.encoded for r in results), "index_version": build.version or 0}
    if stdout is not None:
        stdout.write(
            f"Knowledge base '{kb.slug}' ({'created' if created else 'kept'}): {len(document_ids)} documents, "
            f"{summary['ingested']} ingested, {summary['encoded']} chunks encoded, index v{summary['index_version']} "
            f"({build.status})."
        )
        for result in failed:
            stdout.write(f"  failed: {result.name}: {result.error_code}: {result.error_message}")
    return summary
