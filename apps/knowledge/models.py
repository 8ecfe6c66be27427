"""Knowledge bases, their documents, chunks with stored embeddings, and index versions.

The database is the source of truth for content and for which index version is active; the index
files under INDEX_ROOT are derived artifacts that can always be rebuilt from stored chunks.
"""
from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _


def default_embedding_model() -> str:
    from .embeddings import default_model_key

    return default_model_key()


def default_embedding_model_auto() -> bool:
    from .embeddings import default_model_auto

    return default_model_auto()


def default_embedding_choice() -> dict:
    """Undecided for an automatic base; else the model came from EMBEDDING_DEFAULT_MODEL."""
    from django.utils import timezone

    from .embeddings import default_model_auto, default_model_key

    return {} if default_model_auto() else {"by": "setting", "model": default_model_key(),
                                            "at": timezone.now().isoformat()}


class KnowledgeBase(models.Model):
    class Fusion(models.TextChoices):
        AUTO = "auto", _("Measured default of the embedding model")
        RRF = "rrf", _("Reciprocal rank fusion")
        WEIGHTED = "weighted", _("Weighted (min-max normalised scores)")
        ZSCORE = "zscore", _("Weighted (z-score normalised scores)")

    slug = models.SlugField(verbose_name=_("slug"), max_length=64, unique=True)
    name = models.CharField(verbose_name=_("name"), max_length=200)
    description = models.TextField(verbose_name=_("description"), blank=True)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("owner"), null=True, blank=True, on_delete=models.SET_NULL, related_name="knowledge_bases"
    )
    allowed_groups = models.ManyToManyField(Group, verbose_name=_("allowed groups"), blank=True, related_name="knowledge_bases",
                                            help_text=_("Members of these groups may search this knowledge base."))
    is_public = models.BooleanField(verbose_name=_("is public"), default=False, help_text=_("Everyone who can use the assistant may search it."))
    # The per-base knowledge editor role (apps/core/authz.py): members edit this base and its documents.
    editor_groups = models.ManyToManyField(Group, verbose_name=_("editor groups"), blank=True, related_name="edited_knowledge_bases",
                                           help_text=_("Members of these groups may edit this knowledge base and "
                                                       "its documents (and search it)."))

    # Embedding model (a key of embeddings.model_catalog()). Changing it re-embeds in the background and
    # swaps in a version built with the new model; searches use the old version and model meanwhile.
    embedding_model = models.CharField(verbose_name=_("embedding model"), max_length=64, default=default_embedding_model,
                                       help_text=_("Changing it re-embeds every chunk in the background."))
    # Automatic choice (bases created without a model, EMBEDDING_DEFAULT_MODEL=auto): the documents' language
    # decides `embedding_model` before their first vectors are made, and later uploads may switch it once to
    # the multilingual model (model_choice.py). An editor's explicit choice turns it off.
    embedding_model_auto = models.BooleanField(verbose_name=_("choose the embedding model automatically"),
                                               default=default_embedding_model_auto,
                                               help_text=_("By the language of the documents: the multilingual "
                                                           "model when they hold a meaningful share of Chinese."))
    # Why `embedding_model` is what it is: {"by": "language", "model", "tokens", "cjk_tokens", "cjk_share",
    # "documents", "at", "switched_from"?} or {"by": "editor" | "setting", "at"}; empty: not decided yet.
    embedding_choice = models.JSONField(verbose_name=_("embedding model choice"), default=default_embedding_choice,
                                        blank=True, editable=False)

    # Chunking: sized in the embedding model's tokens (all-MiniLM-L6-v2 reads at most 254).
    chunk_tokens = models.PositiveSmallIntegerField(verbose_name=_("chunk tokens"), default=200, validators=[MinValueValidator(32),
                                                                             MaxValueValidator(254)])
    chunk_overlap = models.PositiveSmallIntegerField(verbose_name=_("chunk overlap"), default=40, validators=[MaxValueValidator(128)])

    # Retrieval.
    fusion = models.CharField(verbose_name=_("fusion"), max_length=16, choices=Fusion.choices, default=Fusion.AUTO,
                              help_text=_("How dense and keyword results are combined. The measured default "
                                          "depends on the embedding model (rrf k and dense weight are then not "
                                          "used); evaluate --calibrate --save chooses on the base's own questions."))
    rrf_k = models.PositiveSmallIntegerField(verbose_name=_("rrf k"), default=60, validators=[MinValueValidator(1)])
    dense_weight = models.FloatField(verbose_name=_("dense weight"), default=0.5, validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
                                     help_text=_("Weighted and z-score fusion: weight of the dense score (BM25 gets the "
                                                 "rest)."))
    candidates = models.PositiveSmallIntegerField(verbose_name=_("candidates"), default=100, validators=[MinValueValidator(10),
                                                                           MaxValueValidator(1000)],
                                                  help_text=_("Hits taken from each of FAISS and BM25 before fusion."))
    mmr_lambda = models.FloatField(verbose_name=_("mmr lambda"), null=True, blank=True, validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
                                   help_text=_("Set (e.g. 0.7) to diversify results with MMR; empty disables it."))
    # What `manage.py evaluate --calibrate --save` chose for fusion, rrf_k, dense_weight and mmr_lambda, on
    # which evaluation set and with what score; empty until a base has been calibrated.
    retrieval_calibration = models.JSONField(verbose_name=_("retrieval calibration"), default=dict, blank=True, editable=False)
    use_reranker = models.BooleanField(verbose_name=_("use reranker"), default=True,
                                       help_text=_("Rerank with the cross-encoder when RERANKER_MODEL_PATH is set."))

    # Keyword search: domain terms (product and policy names) the BM25 analyzer keeps whole.
    user_dictionary = models.TextField(
        _("user dictionary"), blank=True,
        help_text=_("Domain terms for keyword search, one per line (product and policy names, e.g. 安心保障计划 "
                  "or Premium Care Plus); lines starting with # are comments. Applied at the next index rebuild."))

    # Bumped in the same transaction as every chunk change, so an index records exactly what it covers.
    content_revision = models.PositiveBigIntegerField(verbose_name=_("content revision"), default=0, editable=False)
    # Index versions are allocated here under a row lock: concurrent rebuilds never share a number.
    last_index_version = models.PositiveIntegerField(verbose_name=_("last index version"), default=0, editable=False)
    # Set when the knowledge base is deleted: hidden from every listing and search at once, removed by a
    # background task (documents, chunks, files, indexes) that records its progress here.
    deleted_at = models.DateTimeField(verbose_name=_("deleted at"), null=True, blank=True, editable=False, db_index=True)
    delete_progress = models.JSONField(verbose_name=_("delete progress"), default=dict, blank=True, editable=False)

    created_at = models.DateTimeField(verbose_name=_("created at"), auto_now_add=True)
    updated_at = models.DateTimeField(verbose_name=_("updated at"), auto_now=True)

    class Meta:
        verbose_name = _("knowledge base")
        verbose_name_plural = _("knowledge bases")
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


def document_upload_to(instance: "Document", filename: str) -> str:
    return f"knowledge/{instance.knowledge_base_id}/{filename}"


class Document(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", _("Pending")
        PROCESSING = "processing", _("Processing")
        READY = "ready", _("Ready")
        FAILED = "failed", _("Failed")

    knowledge_base = models.ForeignKey(KnowledgeBase, verbose_name=_("knowledge base"), on_delete=models.CASCADE, related_name="documents")
    title = models.CharField(verbose_name=_("title"), max_length=300, blank=True)
    file = models.FileField(verbose_name=_("file"), upload_to=document_upload_to, max_length=500, blank=True)
    source_url = models.URLField(verbose_name=_("source url"), max_length=1000, blank=True)
    # What the document was called where it came from (upload name or path relative to an ingest root):
    # the ingest command updates a document with the same source name instead of duplicating it.
    source_name = models.CharField(verbose_name=_("source name"), max_length=500, blank=True, db_index=True)
    detected_type = models.CharField(verbose_name=_("detected type"), max_length=16, blank=True)
    size_bytes = models.PositiveBigIntegerField(verbose_name=_("size bytes"), default=0)
    sha256 = models.CharField(verbose_name=_("sha256"), max_length=64, blank=True, db_index=True)
    page_count = models.PositiveIntegerField(verbose_name=_("page count"), null=True, blank=True)
    # Canonical parsed text: chunk character spans point into it (the source view highlights them).
    text = models.TextField(verbose_name=_("text"), blank=True, editable=False)

    status = models.CharField(verbose_name=_("status"), max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    error_code = models.CharField(verbose_name=_("error code"), max_length=40, blank=True)
    error_message = models.TextField(verbose_name=_("error message"), blank=True)
    version = models.PositiveIntegerField(verbose_name=_("version"), default=1, help_text=_("Incremented each time the content changes."))
    # Fingerprint of what the current chunks were built from (content + chunking + model): re-ingesting
    # with the same fingerprint is a no-op, which makes the ingest task idempotent.
    ingest_fingerprint = models.CharField(verbose_name=_("ingest fingerprint"), max_length=64, blank=True, editable=False)
    ingested_at = models.DateTimeField(verbose_name=_("ingested at"), null=True, blank=True)
    # Times the sweeper found this document stuck (pending or processing too long) and re-enqueued it;
    # past KNOWLEDGE_INGEST_MAX_ATTEMPTS it is parked as failed with its last error.
    ingest_attempts = models.PositiveSmallIntegerField(verbose_name=_("ingest attempts"), default=0, editable=False)
    # The language mix of `text` (rag.language: one token per CJK character or other word), summed per base
    # for the automatic model choice; null: not measured yet (measured lazily when needed).
    lang_tokens = models.PositiveIntegerField(verbose_name=_("text tokens"), null=True, blank=True, editable=False)
    lang_cjk_tokens = models.PositiveIntegerField(verbose_name=_("CJK tokens"), default=0, editable=False)
    # Set when an editor deletes the document; search hides it at once, the delete task purges it.
    deleted_at = models.DateTimeField(verbose_name=_("deleted at"), null=True, blank=True, db_index=True)

    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, verbose_name=_("created by"), null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    updated_by = models.ForeignKey(settings.AUTH_USER_MODEL, verbose_name=_("updated by"), null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(verbose_name=_("created at"), auto_now_add=True)
    updated_at = models.DateTimeField(verbose_name=_("updated at"), auto_now=True)

    class Meta:
        verbose_name = _("document")
        verbose_name_plural = _("documents")
        ordering = ["-updated_at", "-id"]
        indexes = [models.Index(fields=["knowledge_base", "status"])]

    def __str__(self) -> str:
        return self.title or self.source_name or f"Document {self.pk}"


class Chunk(models.Model):
    document = models.ForeignKey(Document, verbose_name=_("document"), on_delete=models.CASCADE, related_name="chunks")
    position = models.PositiveIntegerField(verbose_name=_("position"))
    text = models.TextField(verbose_name=_("text"))
    page = models.PositiveIntegerField(verbose_name=_("page"), null=True, blank=True)
    heading_path = models.JSONField(verbose_name=_("heading path"), default=list, blank=True)
    char_start = models.PositiveIntegerField(verbose_name=_("char start"))
    char_end = models.PositiveIntegerField(verbose_name=_("char end"))
    token_count = models.PositiveIntegerField(verbose_name=_("token count"))
    content_hash = models.CharField(verbose_name=_("content hash"), max_length=64)
    # Keyword-search context indexed with the text (not shown, not embedded): document title and
    # heading path, and the other form of abbreviations the chunk uses (rag.chunker._add_context).
    search_context = models.TextField(verbose_name=_("search context"), blank=True, default="")
    # float32 little-endian bytes of the L2-normalised vector; reused by (embedding_model, content_hash).
    embedding = models.BinaryField(verbose_name=_("embedding"), null=True, blank=True, editable=False)
    embedding_model = models.CharField(verbose_name=_("embedding model"), max_length=200, blank=True)
    # Set when a re-ingest replaces this chunk. The row stays while an index version that contains it
    # may still be serving (grace period), so a search on the old version returns that version's text.
    superseded_at = models.DateTimeField(verbose_name=_("superseded at"), null=True, blank=True)

    class Meta:
        verbose_name = _("chunk")
        verbose_name_plural = _("chunks")
        ordering = ["document_id", "position"]
        constraints = [
            models.UniqueConstraint(fields=["document", "position"], condition=Q(superseded_at__isnull=True),
                                    name="chunk_unique_current_position"),
        ]
        indexes = [
            models.Index(fields=["embedding_model", "content_hash"], name="chunk_embedding_key"),
            models.Index(fields=["superseded_at"], name="chunk_superseded"),
        ]

    def __str__(self) -> str:
        return f"{self.document_id}#{self.position}"


class IndexVersion(models.Model):
    class Status(models.TextChoices):
        BUILDING = "building", _("Building")
        ACTIVE = "active", _("Active")
        RETIRED = "retired", _("Retired")
        FAILED = "failed", _("Failed")

    knowledge_base = models.ForeignKey(KnowledgeBase, verbose_name=_("knowledge base"), on_delete=models.CASCADE, related_name="index_versions")
    version = models.PositiveIntegerField(verbose_name=_("version"))
    status = models.CharField(verbose_name=_("status"), max_length=16, choices=Status.choices, default=Status.BUILDING)
    artifact_path = models.CharField(verbose_name=_("artifact path"), max_length=1000, blank=True)
    source_revision = models.PositiveBigIntegerField(verbose_name=_("source revision"), default=0)
    document_count = models.PositiveIntegerField(verbose_name=_("document count"), default=0)
    chunk_count = models.PositiveIntegerField(verbose_name=_("chunk count"), default=0)
    # The model that built the dense index (also in the manifest): its id, catalog key, backend, dimension.
    embedding_model = models.CharField(verbose_name=_("embedding model"), max_length=200, blank=True)
    embedding_key = models.CharField(verbose_name=_("embedding key"), max_length=64, blank=True)
    embedding_backend = models.CharField(verbose_name=_("embedding backend"), max_length=16, blank=True)
    embedding_dimension = models.PositiveIntegerField(verbose_name=_("embedding dimension"), null=True, blank=True)
    # Progress of a build that has to encode (a model change): chunks to encode, and encoded so far.
    encode_total = models.PositiveIntegerField(verbose_name=_("encode total"), default=0)
    dense_kind = models.CharField(verbose_name=_("dense kind"), max_length=16, blank=True)
    build_seconds = models.FloatField(verbose_name=_("build seconds"), null=True, blank=True)
    encoded_count = models.PositiveIntegerField(verbose_name=_("encoded count"), default=0, help_text=_("Chunks that had to be encoded for this build."))
    # full: every chunk written anew; incremental: one new segment plus tombstones; merge: also merged segments.
    build_kind = models.CharField(verbose_name=_("build kind"), max_length=16, blank=True)
    segment_count = models.PositiveSmallIntegerField(verbose_name=_("segment count"), default=0)
    written_count = models.PositiveIntegerField(verbose_name=_("written count"), default=0, help_text=_("Chunks written into new segments by this build."))
    tombstone_count = models.PositiveIntegerField(verbose_name=_("tombstone count"), default=0)
    error_message = models.TextField(verbose_name=_("error message"), blank=True)
    created_at = models.DateTimeField(verbose_name=_("created at"), auto_now_add=True)
    activated_at = models.DateTimeField(verbose_name=_("activated at"), null=True, blank=True)
    retired_at = models.DateTimeField(verbose_name=_("retired at"), null=True, blank=True)
    artifact_removed_at = models.DateTimeField(verbose_name=_("artifact removed at"), null=True, blank=True)

    class Meta:
        verbose_name = _("index version")
        verbose_name_plural = _("index versions")
        ordering = ["knowledge_base_id", "-version"]
        constraints = [
            models.UniqueConstraint(fields=["knowledge_base", "version"], name="index_version_unique"),
            models.UniqueConstraint(fields=["knowledge_base"], condition=Q(status="active"),
                                    name="index_version_one_active"),
        ]

    def __str__(self) -> str:
        return f"{self.knowledge_base_id} v{self.version} ({self.status})"
