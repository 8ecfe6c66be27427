"""Retrieval quality measured through the platform's own ingestion and ranking.

Two kinds of evaluation set:

- a BEIR-format dataset (`beir_corpus_load`, `beir_evaluate`): nDCG@10, Recall@100, MRR@10;
- a labelled question set for any knowledge base (`labelled_documents_load`, `labelled_evaluate`): JSONL
  lines of question, expected document and a passage of the expected answer; hit@1/3/5/10 and MRR@10
  (the hit rule is defined in `rag.evaluation`).

For BEIR, the corpus goes into a scratch knowledge base (one Document per corpus document, text = title +
blank line + text), so later runs find every document unchanged and encode nothing. Queries use
only their `text`. Chunk hits are aggregated to documents by their best chunk (max score).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from django.db import transaction

from .models import Chunk, Document, KnowledgeBase
from .rag.evaluation import (PASSAGE_COVERAGE, LabelledQuestion, evaluate_run, first_hit_rank, hit_metrics, load_beir, load_questions,
                             question_subsets)
from .selectors import ranked_chunk_ids
from .services import IngestOutcome, document_import, documents_ingest, files_ingest, index_rebuild

# Published nDCG@10 figures per dataset (SciFact: ../shared/datasets/scifact/SOURCE.md). A dataset folder may
# carry its own in references.json ({"ndcg@10": {"dense": ..., "bm25": ...}, "note": "..."}); a dataset
# with neither shows none rather than another dataset's.
REFERENCES = {"scifact": {"ndcg@10": {"dense": 0.645, "bm25": 0.665},
                          "note": "all-MiniLM-L6-v2 dense 0.645 (MTEB), BM25 0.665 (BEIR paper)"}}
REFERENCE_NDCG10 = REFERENCES["scifact"]["ndcg@10"]


def dataset_references(root: Path | str) -> dict:
    """The reference figures of the dataset in `root`: its references.json, else the table above by folder name."""
    root = Path(root)
    try:
        own = json.loads((root / "references.json").read_text(encoding="utf-8"))
        if isinstance(own, dict) and isinstance(own.get("ndcg@10"), dict):
            return own
    except (OSError, ValueError):
        pass
    return REFERENCES.get(root.name.lower(), {})
RUN_DEPTH_DOCUMENTS = 100


@dataclass
class LoadStats:
    documents: int = 0
    imported: int = 0
    unchanged: int = 0
    ingested: int = 0
    failed: int = 0
    encoded: int = 0
    reused: int = 0
    chunks: int = 0
    index_version: int | None = None
    seconds: float = 0.0
    failures: list[IngestOutcome] = field(default_factory=list)


def scratch_knowledge_base(*, slug: str, name: str, chunk_tokens: int | None = None,
                           chunk_overlap: int | None = None) -> KnowledgeBase:
    """A private knowledge base with no owner (only staff can read it) for evaluation runs."""
    kb, _ = KnowledgeBase.objects.get_or_create(slug=slug, defaults={"name": name, "is_public": False})
    changed = []
    if chunk_tokens is not None and kb.chunk_tokens != chunk_tokens:
        kb.chunk_tokens = chunk_tokens
        changed.append("chunk_tokens")
    if chunk_overlap is not None and kb.chunk_overlap != chunk_overlap:
        kb.chunk_overlap = chunk_overlap
        changed.append("chunk_overlap")
    if changed:
        kb.save(update_fields=changed + ["updated_at"])
    return kb


def beir_corpus_load(*, knowledge_base: KnowledgeBase, corpus: dict[str, dict[str, str]],
                     on_progress: Callable[[int], None] | None = None) -> LoadStats:
    """Import, ingest and index the corpus; unchanged documents cost one dictionary lookup each."""
    started = time.perf_counter()
    stats = LoadStats(documents=len(corpus))
    known = dict(knowledge_base.documents.filter(deleted_at__isnull=True).values_list("source_name", "sha256"))
    with transaction.atomic():
        for doc_id, doc in corpus.items():
            data = f"{doc['title']}\n\n{doc['text']}".encode("utf-8")
            name = f"{doc_id}.txt"
            if known.get(name) == hashlib.sha256(data).hexdigest():
                stats.unchanged += 1
                continue
            document_import(knowledge_base=knowledge_base, user=None, name=name, data=data, title=doc["title"][:300])
            stats.imported += 1
    # Every live document goes through ingestion: its fingerprint check makes unchanged ones free,
    # and catches documents left unfinished by an interrupted run or chunked with other sizes.
    to_ingest = list(knowledge_base.documents.filter(deleted_at__isnull=True).order_by("id").values_list("id", flat=True))

    def progress(batch: list[IngestOutcome]) -> None:
        if on_progress is not None:
            on_progress(len(batch))

    results = documents_ingest(document_ids=to_ingest, rebuild=False, on_progress=progress)
    for result in results:
        stats.ingested += result.status == "ready"
        stats.encoded += result.encoded
        stats.reused += result.reused
        if result.status == "failed":
            stats.failed += 1
            stats.failures.append(result)
    build = index_rebuild(knowledge_base_id=knowledge_base.pk)
    stats.index_version, stats.chunks = build.version, build.chunk_count
    stats.seconds = time.perf_counter() - started
    knowledge_base.refresh_from_db()  # ingestion may have chosen its model (and so its served fusion)
    return stats


@dataclass
class EvaluationResult:
    mode: str
    metrics: dict[str, float]
    queries: int
    seconds: float
    reference_ndcg10: float | None


def beir_evaluate(*, knowledge_base: KnowledgeBase, queries: dict[str, str], qrels: dict[str, dict[str, int]],
                  mode: str, on_progress: Callable[[int], None] | None = None,
                  dataset: Path | str | None = None) -> EvaluationResult:
    """nDCG@10, Recall@100 and MRR@10 of `mode` over the judged queries."""
    names = dict(Document.objects.filter(knowledge_base=knowledge_base).values_list("id", "source_name"))
    chunk_doc = dict(Chunk.objects.filter(document__knowledge_base=knowledge_base, superseded_at__isnull=True)
                     .values_list("id", "document_id"))
    started = time.perf_counter()
    run: dict[str, list[str]] = {}
    # Chunks per document vary; ask for enough chunks to fill RUN_DEPTH_DOCUMENTS distinct documents.
    depth = RUN_DEPTH_DOCUMENTS * 4
    for query_id, text in queries.items():
        best: dict[str, float] = {}
        for chunk_id, score in ranked_chunk_ids(knowledge_base=knowledge_base, query=text, top_k=depth, mode=mode):
            document_id = chunk_doc.get(chunk_id)
            if document_id is None:
                continue
            corpus_id = Path(names[document_id]).stem
            if corpus_id not in best:  # ranked best first: the first hit is the document's max
                best[corpus_id] = score
        run[query_id] = list(best)[:RUN_DEPTH_DOCUMENTS]
        if on_progress is not None:
            on_progress(1)
    metrics = evaluate_run(run, qrels, ndcg_k=(10,), recall_k=(100,), mrr_k=(10,))
    references = dataset_references(dataset).get("ndcg@10", {}) if dataset is not None else REFERENCE_NDCG10
    return EvaluationResult(mode, metrics, len(queries), time.perf_counter() - started, references.get(mode))


# ------------------------------------------------------------------------------------------
# Labelled question sets
# ------------------------------------------------------------------------------------------

LABELLED_DEPTH = 10


def files_under(root: Path) -> list[tuple[str, Path]]:
    """(source name relative to `root`, path) of every non-hidden file below `root`, sorted."""
    files = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append((relative.as_posix(), path))
    return files


def labelled_documents_load(*, knowledge_base: KnowledgeBase, root: Path,
                            on_progress: Callable[[int], None] | None = None) -> LoadStats:
    """Ingest every file below `root` (named by its relative path) and rebuild the index once.

    The usual ingestion path: unchanged files are skipped and stored embeddings reused, so a second
    run encodes nothing. Documents of the base that are not below `root` are left alone.
    """
    started = time.perf_counter()
    files = files_under(root)
    report = files_ingest(knowledge_base=knowledge_base, files=files, on_progress=on_progress)
    counts = report.counts()
    stats = LoadStats(documents=len(files), imported=counts.get("ready", 0) + counts.get("failed", 0),
                      unchanged=counts.get("unchanged", 0), ingested=counts.get("ready", 0),
                      failed=counts.get("failed", 0) + counts.get("rejected", 0), encoded=report.encoded,
                      reused=report.reused)
    stats.failures = [o for o in report.outcomes if o.status in ("failed", "rejected")]
    if report.build is not None:
        stats.index_version, stats.chunks = report.build.version, report.build.chunk_count
    stats.seconds = time.perf_counter() - started
    knowledge_base.refresh_from_db()  # ingestion may have chosen its model (and so its served fusion)
    return stats


@dataclass
class LabelledResult:
    mode: str
    metrics: dict[str, float]
    subsets: dict[str, dict[str, float]]
    per_question: list[dict]
    seconds: float
    cpu_seconds: float

    def to_dict(self) -> dict:
        return {"mode": self.mode, "metrics": self.metrics, "subsets": self.subsets,
                "ms_per_query": 1000 * self.seconds / max(len(self.per_question), 1),
                "cpu_ms_per_query": 1000 * self.cpu_seconds / max(len(self.per_question), 1),
                "questions": self.per_question}


def labelled_evaluate(*, knowledge_base: KnowledgeBase, questions: list[LabelledQuestion], mode: str,
                      on_progress: Callable[[int], None] | None = None) -> LabelledResult:
    """hit@1/3/5/10, MRR@10 and document-only hit@3 of `mode`, overall and per subset (language, tag).

    Ranks with exactly the ranking users get (`selectors.ranked_chunk_ids`, the base's own fusion and
    ranking settings), without the cache; the top LABELLED_DEPTH chunks are judged.
    """
    ranks: list[tuple[int | None, int | None]] = []
    per_question: list[dict] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    for question in questions:
        ranked = ranked_chunk_ids(knowledge_base=knowledge_base, query=question.question, top_k=LABELLED_DEPTH,
                                  mode=mode)
        ids = [chunk_id for chunk_id, _ in ranked]
        rows = {row[0]: row[1:] for row in Chunk.objects.filter(pk__in=ids)
                .values_list("id", "document__source_name", "document__title", "text")}
        judged = [rows[chunk_id] for chunk_id in ids if chunk_id in rows]
        hit, doc = first_hit_rank(question, judged)
        ranks.append((hit, doc))
        per_question.append({"id": question.id, "rank": hit, "doc_rank": doc,
                             "top": judged[0][0] if judged else None})
        if on_progress is not None:
            on_progress(1)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    subsets = {name: hit_metrics([ranks[i] for i in members])
               for name, members in question_subsets(questions).items()}
    return LabelledResult(mode, hit_metrics(ranks), subsets, per_question, seconds, cpu)


__all__ = ["beir_corpus_load", "beir_evaluate", "beir_metric", "labelled_documents_load", "labelled_evaluate",
           "labelled_metric", "load_beir", "query_candidates", "ranking_calibrate",
           "load_questions", "scratch_knowledge_base", "REFERENCE_NDCG10"]


# ------------------------------------------------------------------------------------------
# Calibrating fusion and ranking on training queries
# ------------------------------------------------------------------------------------------


def query_candidates(*, knowledge_base: KnowledgeBase, queries: list[str], depth: int, with_vectors: bool = False,
                     on_progress: Callable[[int], None] | None = None) -> list:
    """Dense and BM25 candidate lists (each `max(candidates, depth)` long) of every query, as retrieval
    computes them on the active index version; with `with_vectors`, the candidates' stored vectors for MMR."""
    from .embeddings import query_encoder_for
    from .index_registry import registry
    from .rag.calibration import QueryCandidates

    bundle = registry.bundle(knowledge_base.pk)
    if bundle is None:
        raise ValueError(f"knowledge base {knowledge_base.slug!r} has no active index")
    n = max(knowledge_base.candidates, depth)
    model = query_encoder_for(bundle.embedding)  # the model that built the version
    if model is None:
        raise ValueError(f"knowledge base {knowledge_base.slug!r}: no encoder here for {bundle.model_id!r}")
    result = []
    for text in queries:
        query_vec = model.encode_query(text)
        dense, bm25 = bundle.dense_search(query_vec, n), bundle.bm25_search(text, n)
        vectors = None
        if with_vectors:
            ids = list(dict.fromkeys([i for i, _ in dense] + [i for i, _ in bm25]))
            vectors = dict(zip(ids, bundle.vectors(ids)))
        result.append(QueryCandidates(dense, bm25, query_vec if with_vectors else None, vectors))
        if on_progress is not None:
            on_progress(1)
    return result


def current_ranking_params(knowledge_base: KnowledgeBase):
    from .rag.calibration import RankingParams

    from .embeddings import served_fusion

    return RankingParams(*served_fusion(knowledge_base), knowledge_base.mmr_lambda)


@dataclass
class CalibrationResult:
    current: dict
    chosen: dict
    current_score: float
    chosen_score: float
    objective: str
    queries: int
    scored: list[tuple[str, float]]
    cross_validation: dict | None
    saved: bool

    def to_dict(self) -> dict:
        return {"current": self.current, "chosen": self.chosen, "current_score": self.current_score,
                "chosen_score": self.chosen_score, "objective": self.objective, "queries": self.queries,
                "top": self.scored[:10], "cross_validation": self.cross_validation, "saved": self.saved}


def ranking_calibrate(*, knowledge_base: KnowledgeBase, candidates: list, metric, objective: str, source: str,
                      save: bool, cross_validate: bool = False, try_mmr: bool = False,
                      min_gain: float = 0.002) -> CalibrationResult:
    """Choose fusion (RRF k, min-max or z-score weight) and optionally an MMR lambda on training queries;
    with `save`, store them on the knowledge base (the settings retrieval uses) with a record of what was
    measured. The current settings stay unless beaten by more than `min_gain`."""
    from django.utils import timezone

    from .rag import calibration

    current = current_ranking_params(knowledge_base)
    chosen, scored = calibration.choose(candidates, metric, current=current, min_gain=min_gain, try_mmr=try_mmr)
    cv = (calibration.cross_validate(candidates, metric, current=current, min_gain=min_gain, try_mmr=try_mmr)
          if cross_validate else None)
    if cv is not None and cv["held_out"] <= cv["current_held_out"]:
        # Choosing on part of the set did not beat the current settings on the rest: the in-sample gain
        # is noise, so the current settings stay.
        chosen = current
    result = CalibrationResult(
        current=current.to_dict(), chosen=chosen.to_dict(),
        current_score=calibration.score(current, candidates, metric),
        chosen_score=calibration.score(chosen, candidates, metric), objective=objective, queries=len(candidates),
        scored=[(params.label(), round(value, 4)) for params, value in scored], cross_validation=cv, saved=False)
    if save:
        knowledge_base.fusion, knowledge_base.rrf_k = chosen.fusion, chosen.rrf_k
        knowledge_base.dense_weight, knowledge_base.mmr_lambda = chosen.dense_weight, chosen.mmr_lambda
        knowledge_base.retrieval_calibration = {
            "source": source, "objective": objective, "queries": len(candidates), "chosen": chosen.to_dict(),
            "score": round(result.chosen_score, 4), "previous": current.to_dict(),
            "previous_score": round(result.current_score, 4), "at": timezone.now().isoformat(),
            "cross_validation": result.cross_validation}
        knowledge_base.save(update_fields=["fusion", "rrf_k", "dense_weight", "mmr_lambda", "retrieval_calibration",
                                           "updated_at"])
        result.saved = True
    return result


def beir_metric(*, knowledge_base: KnowledgeBase, query_ids: list[str], qrels: dict[str, dict[str, int]]):
    """nDCG@10 of a chunk ranking, chunks aggregated to corpus documents by their best chunk."""
    from .rag.evaluation import ndcg_at_k

    names = dict(Document.objects.filter(knowledge_base=knowledge_base).values_list("id", "source_name"))
    chunk_doc = {cid: Path(names[did]).stem for cid, did in Chunk.objects.filter(
        document__knowledge_base=knowledge_base).values_list("id", "document_id") if did in names}

    def metric(index: int, ranked) -> float:
        docs = list(dict.fromkeys(chunk_doc[cid] for cid, _ in ranked if cid in chunk_doc))
        return ndcg_at_k(docs[:10], qrels.get(query_ids[index], {}), 10)

    return metric


def labelled_metric(*, knowledge_base: KnowledgeBase, questions: list[LabelledQuestion]):
    """MRR@10 of a chunk ranking under the labelled hit rule."""
    rows = {cid: (source, title, text) for cid, source, title, text in Chunk.objects.filter(
        document__knowledge_base=knowledge_base).values_list("id", "document__source_name", "document__title", "text")}

    def metric(index: int, ranked) -> float:
        judged = [rows[cid] for cid, _ in ranked[:LABELLED_DEPTH] if cid in rows]
        hit, _ = first_hit_rank(questions[index], judged)
        return 0.0 if hit is None else 1.0 / hit

    return metric
