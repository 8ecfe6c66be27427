"""Reads for knowledge: access rules, listings, and retrieval (`chunks_retrieve`).

Who may read or edit a knowledge base is decided by apps.core.authz (owner, editor and reader groups,
public bases, Django permissions); these selectors apply it. Callers never filter chunks themselves:
`chunks_retrieve` searches only readable knowledge bases, and drops any hit whose document is no longer
in one of them (a stale index version can still hold a document moved or made private since).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db.models import Count, Max, OuterRef, Q, QuerySet, Subquery
from django.urls import reverse
from django.utils.translation import gettext

from apps.core import authz
from apps.core.errors import ApplicationError, NotFound

from .index_registry import registry
from .metrics import retrieval_seconds
from .models import Chunk, Document, IndexVersion, KnowledgeBase

logger = logging.getLogger(__name__)

MODES = ("hybrid", "dense", "bm25")
MAX_QUERY_CHARS = 2000


# ------------------------------------------------------------------------------------------
# Access
# ------------------------------------------------------------------------------------------


def knowledge_bases_visible(*, user) -> QuerySet[KnowledgeBase]:
    """Knowledge bases `user` may read (anonymous users: public ones only); the rule is apps.core.authz's.
    A deleted base (being removed in the background) is gone from here at once."""
    return authz.knowledge_bases_readable(user).filter(deleted_at__isnull=True)


def knowledge_base_can_edit(*, user, knowledge_base: KnowledgeBase) -> bool:
    return authz.can(user, "knowledge.edit", knowledge_base)


def knowledge_base_can_create(*, user) -> bool:
    return authz.can(user, "knowledge.create")


def knowledge_base_get(*, user, ref: int | str) -> KnowledgeBase:
    """A readable knowledge base by id or slug; unreadable and nonexistent look the same (404)."""
    visible = knowledge_bases_visible(user=user)
    kb = None
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
        kb = visible.filter(pk=int(ref)).first()
    if kb is None and isinstance(ref, str):
        kb = visible.filter(slug=ref).first()
    if kb is None:
        raise NotFound(gettext("No such knowledge base."), code="knowledge_base_not_found", details={"knowledge_base": ref})
    return kb


def knowledge_bases_with_stats(*, user) -> QuerySet[KnowledgeBase]:
    active = IndexVersion.objects.filter(knowledge_base=OuterRef("pk"), status=IndexVersion.Status.ACTIVE)
    return (knowledge_bases_visible(user=user)
            .annotate(document_count=Count("documents", filter=Q(documents__deleted_at__isnull=True), distinct=True),
                      active_version=Subquery(active.values("version")[:1]),
                      last_build_at=Max("index_versions__created_at"))
            .select_related("owner"))


def documents_for(*, user, knowledge_base: KnowledgeBase, status: str | None = None) -> QuerySet[Document]:
    if not knowledge_bases_visible(user=user).filter(pk=knowledge_base.pk).exists():
        raise NotFound(gettext("No such knowledge base."), code="knowledge_base_not_found")
    qs = knowledge_base.documents.filter(deleted_at__isnull=True).annotate(
        chunk_count=Count("chunks", filter=Q(chunks__superseded_at__isnull=True)))
    if status:
        if status not in Document.Status.values:
            raise ApplicationError("invalid_status", gettext("status must be one of %(values)s.")
                                                     % {"values": ', '.join(Document.Status.values)},
                                   details={"status": status})
        qs = qs.filter(status=status)
    return qs.order_by("-updated_at", "-id")


def document_get(*, user, document_id: int) -> Document:
    document = (Document.objects.select_related("knowledge_base")
                .filter(pk=document_id, deleted_at__isnull=True,
                        knowledge_base__in=knowledge_bases_visible(user=user)).first())
    if document is None:
        raise NotFound(gettext("No such document."), code="document_not_found")
    return document


def document_chunks(*, document: Document) -> QuerySet[Chunk]:
    return document.chunks.filter(superseded_at__isnull=True).order_by("position")


def source_view_context(*, user, document_id: int, chunk_id: int | None) -> dict[str, Any]:
    """What the source page shows: the document text split around the cited chunk.

    A chunk replaced by a newer version of the document is located by its text when it is still
    there; otherwise its own text is shown with a note that the document has changed.
    """
    document = document_get(user=user, document_id=document_id)
    text = document.text
    chunk = Chunk.objects.filter(pk=chunk_id, document=document).first() if chunk_id is not None else None
    before, cited, after, located = text, "", "", chunk is None
    if chunk is not None:
        start, end = chunk.char_start, chunk.char_end
        if text[start:end] != chunk.text:
            found = text.find(chunk.text)
            start, end = (found, found + len(chunk.text)) if found >= 0 else (-1, -1)
        if start >= 0:
            before, cited, after, located = text[:start], text[start:end], text[end:], True
    return {"document": document, "knowledge_base": document.knowledge_base, "chunk": chunk, "before": before,
            "cited": cited, "after": after, "located": located}


# ------------------------------------------------------------------------------------------
# Retrieval
# ------------------------------------------------------------------------------------------


@dataclass
class RetrievedChunk:
    chunk_id: int
    document_id: int
    document_title: str
    knowledge_base_id: int
    knowledge_base_slug: str
    text: str
    page: int | None
    heading_path: list[str]
    char_start: int
    char_end: int
    score: float  # the score used for the final ranking
    scores: dict[str, float] = field(default_factory=dict)  # per stage: dense, bm25, fused, mmr, rerank
    index_version: int = 0
    url: str = ""  # source view: /sources/<document_id>/?chunk=<chunk_id>

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _validate(query: Any, top_k: Any, mode: Any) -> tuple[str, int, str]:
    if not isinstance(query, str) or not query.strip():
        raise ApplicationError("invalid_query", gettext("The query is empty."))
    query = " ".join(query.split())
    if len(query) > MAX_QUERY_CHARS:
        raise ApplicationError("query_too_long", gettext("The query is longer than %(max)s characters.")
                                                 % {"max": MAX_QUERY_CHARS},
                               details={"max_chars": MAX_QUERY_CHARS})
    if mode not in MODES:
        raise ApplicationError("invalid_mode", gettext("mode must be one of %(modes)s.")
                                               % {"modes": ', '.join(MODES)}, details={"mode": mode})
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= settings.RETRIEVAL_MAX_TOP_K:
        raise ApplicationError("invalid_top_k", gettext("top_k must be an integer from 1 to %(k)s.")
                                                % {"k": settings.RETRIEVAL_MAX_TOP_K},
                               details={"top_k": top_k, "max": settings.RETRIEVAL_MAX_TOP_K})
    return query, top_k, mode


def chunks_retrieve(*, user, query: str, knowledge_bases: list[str | int] | None = None, top_k: int = 8,
                    mode: str = "hybrid") -> list[RetrievedChunk]:
    """The `top_k` chunks most relevant to `query` in the knowledge bases `user` may read.

    `knowledge_bases` (ids or slugs) narrows the search; naming one the user cannot read raises
    `knowledge_base_not_found` (404, as for a nonexistent one). Each knowledge base is searched on
    exactly one complete index version. Results of identical queries on the same versions come
    from the cache; activating a version changes the key.
    """
    query, top_k, mode = _validate(query, top_k, mode)
    started = time.perf_counter()
    if knowledge_bases is None:
        kbs = list(knowledge_bases_visible(user=user).order_by("pk"))
    else:
        if not isinstance(knowledge_bases, (list, tuple)):
            raise ApplicationError("invalid_knowledge_bases", gettext("knowledge_bases must be a list of ids or slugs."))
        kbs = list({kb.pk: kb for kb in (knowledge_base_get(user=user, ref=ref) for ref in knowledge_bases)}.values())
    held = _held_bundles(kbs, explicit=knowledge_bases is not None)
    if not held:
        return []
    reranker = _reranker() if any(kb.use_reranker for kb, _ in held) else None
    key = _cache_key(query, top_k, mode, held, reranker)
    ranked = _cache_get(key)
    cache_result = "hit"
    if ranked is None:
        cache_result = "miss"
        ranked = _rank(query, top_k, mode, held, reranker)
        _cache_set(key, ranked)
    ranked = _hits_readable(ranked, {kb.pk for kb, _ in held})
    results = _materialize(ranked, top_k)
    retrieval_seconds.labels(mode=mode, cache=cache_result).observe(time.perf_counter() - started)
    return results


def _held_bundles(kbs: list[KnowledgeBase], *, explicit: bool) -> list:
    """(knowledge base, bundle) for each base with an index. A base whose index cannot be loaded here fails
    the search with `index_unavailable` when it was named; a search over every readable base leaves it out."""
    from .index_registry import IndexUnavailable

    held = []
    for kb in kbs:
        try:
            bundle = registry.bundle(kb.pk)
        except IndexUnavailable as exc:
            if explicit:
                raise ApplicationError(
                    "index_unavailable", gettext("The index of knowledge base '%(slug)s' cannot be loaded right now.")
                                         % {"slug": kb.slug},
                    details={"knowledge_base": kb.slug, "version": exc.failure.version}, status=503) from exc
            logger.warning("knowledge base left out of a search: index unavailable",
                           extra={"knowledge_base": kb.pk, "version": exc.failure.version})
            continue
        if bundle is not None:
            held.append((kb, bundle))
    return held


def _hits_readable(ranked: list[dict[str, Any]], kb_ids: set[int]) -> list[dict[str, Any]]:
    """The access filter: only hits whose document is, now, live in one of the bases being searched (all of
    them readable by the caller). An index version, or a cached ranking, can be older than a move or a
    delete; this reads current rows, so what it lets through is decided by the database, not the index.
    One query on ids: chunk -> (document's knowledge base)."""
    if not ranked:
        return ranked
    current = dict(Chunk.objects.filter(pk__in=[item["id"] for item in ranked], document__deleted_at__isnull=True)
                   .values_list("id", "document__knowledge_base_id"))
    return [item for item in ranked if current.get(item["id"]) in kb_ids]


def ranked_chunk_ids(*, knowledge_base: KnowledgeBase, query: str, top_k: int, mode: str = "hybrid"
                     ) -> list[tuple[int, float]]:
    """(chunk id, score) best first, with no access check, no cache and no top_k cap.

    For operator tools only (the evaluate command measures the same ranking users get).
    """
    held = _held_bundles([knowledge_base], explicit=True)
    if not held:
        return []
    ranked = _rank(query, top_k, mode, held, None)
    return [(item["id"], item["score"]) for item in ranked[:top_k]]


def _kb_settings(kb: KnowledgeBase) -> list:
    from .embeddings import served_fusion

    return [*served_fusion(kb), kb.candidates, kb.mmr_lambda, kb.use_reranker]


def _cache_key(query: str, top_k: int, mode: str, held, reranker) -> str:
    parts = [query, top_k, mode, [[kb.pk, bundle.version, _kb_settings(kb)] for kb, bundle in held],
             getattr(reranker, "path", None)]
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return f"knowledge:retrieve:v1:{digest}"


def _cache_get(key: str):
    try:
        return cache.get(key)
    except Exception:  # a cache outage must not take search down with it
        logger.warning("retrieval cache read failed", exc_info=True)
        return None


def _cache_set(key: str, value) -> None:
    try:
        cache.set(key, value, timeout=settings.RETRIEVAL_CACHE_SECONDS)
    except Exception:
        logger.warning("retrieval cache write failed", exc_info=True)


_RERANKER: dict[str, Any] = {}


def _reranker():
    """The configured cross-encoder (loaded once per process), or None."""
    path = settings.RERANKER_MODEL_PATH
    if not path:
        return None
    if path not in _RERANKER:
        from .rag.rerank import load_reranker

        _RERANKER[path] = load_reranker(path)
    return _RERANKER[path]


def _rank(query: str, top_k: int, mode: str, held, reranker) -> list[dict[str, Any]]:
    """Ranked [{"id", "kb", "version", "score", "scores"}]: a few more than top_k, so that hits in documents
    deleted since can be dropped without returning short."""
    from .embeddings import served_fusion
    from .rag.fusion import fuse, mmr

    needs_vector = mode != "bm25" or any(kb.mmr_lambda is not None for kb, _ in held)
    # Each version is searched with the query vector of the model that built it (encoded once per model).
    query_vecs = _query_vectors(query, [bundle for _, bundle in held]) if needs_vector else {}
    pool: dict[int, dict[str, Any]] = {}
    for kb, bundle in held:
        n = max(kb.candidates, top_k)
        query_vec, encoder_model = query_vecs.get(bundle.model_id, (None, None))
        dense = (bundle.dense_search(query_vec, n, model_id=encoder_model)
                 if mode in ("hybrid", "dense") and query_vec is not None else [])
        bm25 = bundle.bm25_search(query, n) if mode in ("hybrid", "bm25") else []
        if mode == "hybrid":
            fusion, rrf_k, dense_weight = served_fusion(kb)
            fused = fuse(fusion, dense, bm25, rrf_k=rrf_k, dense_weight=dense_weight)
        else:
            fused = dense or bm25
        dense_scores, bm25_scores = dict(dense), dict(bm25)
        for chunk_id, score in fused:
            scores = {}
            if chunk_id in dense_scores:
                scores["dense"] = dense_scores[chunk_id]
            if chunk_id in bm25_scores:
                scores["bm25"] = bm25_scores[chunk_id]
            if mode == "hybrid":
                scores["fused"] = score
            pool[chunk_id] = {"id": chunk_id, "kb": kb.pk, "version": bundle.version, "score": score,
                              "scores": scores, "_bundle": bundle}
    # Across knowledge bases the per-base scores are merged as they are (cosine, RRF, [0, 1] min-max or z-score
    # units): bases that share a fusion share a scale.
    ranked = sorted(pool.values(), key=lambda item: (-item["score"], item["id"]))
    want = top_k * 2
    lambdas = [kb.mmr_lambda for kb, _ in held if kb.mmr_lambda is not None]
    models = {bundle.model_id for _, bundle in held}
    # MMR compares stored vectors with each other: only meaningful within one model's vector space.
    only_vec = query_vecs.get(next(iter(models)), (None, None))[0] if len(models) == 1 else None
    if lambdas and only_vec is not None and len(ranked) > 1:
        ranked = _diversify(ranked[:max(want * 3, 30)], only_vec, min(lambdas), want, mmr)
    if reranker is not None:
        ranked = _rerank(reranker, query, ranked[:max(want * 2, 20)])
    for item in ranked:
        item.pop("_bundle", None)
    return ranked[:want]


def _query_vectors(query: str, bundles) -> dict[str | None, tuple[Any, str | None]]:
    """{version's model id: (query vector, the encoder's model id)} for the models that built these
    versions; a model this process cannot run gets (None, None): its versions answer from BM25 only,
    never with another model's vector."""
    from .embeddings import query_encoder_for

    vectors: dict[str | None, tuple[Any, str | None]] = {}
    for bundle in bundles:
        if bundle.model_id in vectors:
            continue
        encoder = query_encoder_for(bundle.embedding)
        vectors[bundle.model_id] = ((encoder.encode_query(query), encoder.model_id) if encoder is not None
                                    else (None, None))
    return vectors


def _diversify(candidates: list[dict], query_vec, lambda_: float, want: int, mmr) -> list[dict]:
    import numpy as np

    vectors = np.vstack([item["_bundle"].vectors([item["id"]]) for item in candidates])
    by_id = {item["id"]: item for item in candidates}
    chosen = []
    for chunk_id, score in mmr([c["id"] for c in candidates], vectors, query_vec, lambda_=lambda_, top_k=want):
        item = by_id[chunk_id]
        item["scores"]["mmr"] = score
        item["score"] = score
        chosen.append(item)
    return chosen


def _rerank(reranker, query: str, candidates: list[dict]) -> list[dict]:
    texts = dict(Chunk.objects.filter(pk__in=[c["id"] for c in candidates]).values_list("id", "text"))
    candidates = [c for c in candidates if c["id"] in texts]
    scores = reranker.rerank(query, [texts[c["id"]] for c in candidates])
    for item, score in zip(candidates, scores):
        item["scores"]["rerank"] = float(score)
        item["score"] = float(score)
    return sorted(candidates, key=lambda item: (-item["score"], item["id"]))


MATERIALIZED_FIELDS = ("id", "text", "page", "heading_path", "char_start", "char_end", "document__id",
                       "document__title", "document__source_name", "document__knowledge_base__id",
                       "document__knowledge_base__slug")


def _document_title(document: Document) -> str:
    return document.title or document.source_name or f"Document {document.pk}"


def _materialize(ranked: list[dict[str, Any]], top_k: int) -> list[RetrievedChunk]:
    """Chunk rows for the ranked ids in one query; hits in documents deleted since are dropped."""
    ids = [item["id"] for item in ranked]
    # Only what a result shows: never Document.text (a whole parsed document per hit) nor embeddings.
    rows = {chunk.pk: chunk for chunk in Chunk.objects.filter(pk__in=ids, document__deleted_at__isnull=True,
                                                              document__knowledge_base__deleted_at__isnull=True)
            .select_related("document__knowledge_base")
            .only(*MATERIALIZED_FIELDS)}
    results = []
    for item in ranked:
        chunk = rows.get(item["id"])
        if chunk is None:
            continue
        document, kb = chunk.document, chunk.document.knowledge_base
        results.append(RetrievedChunk(
            chunk_id=chunk.pk, document_id=document.pk, document_title=_document_title(document),
            knowledge_base_id=kb.pk, knowledge_base_slug=kb.slug, text=chunk.text, page=chunk.page,
            heading_path=list(chunk.heading_path or []), char_start=chunk.char_start, char_end=chunk.char_end,
            score=float(item["score"]), scores={k: float(v) for k, v in item["scores"].items()},
            index_version=item["version"],
            url=f"{reverse('knowledge-source', args=[document.pk])}?chunk={chunk.pk}",
        ))
        if len(results) == top_k:
            break
    return results
