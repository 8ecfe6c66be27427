"""Dense (FAISS) and lexical (BM25) indexes as immutable segments, and index versions (views) over them.

Layout under a knowledge base's root::

    segments/s000007-a1b2c3/   one immutable segment: dense index + BM25 postings + chunk and document ids
    v000009/                   one version (a "view"): manifest.json naming its segments, and per segment
                               the tombstones (chunk ids deleted since the segment was written)

A version is cheap: adding or changing documents writes one new small segment with their chunks and
tombstones the chunks they replace in older segments; the other segments are shared, unchanged, with
the previous version (and, in a process that holds both, shared in memory too). Small segments are
merged in the background (``plan_merge``: size tiers of factor 8, four per tier; a segment with more
than 30% tombstones is rewritten), so a base holds O(log n) segments and every chunk is rewritten
O(log n) times over its life.

Both segment and version directories are written under a temporary name, fsynced and renamed into
place (a version's ``manifest.json`` is its last file), so what exists is complete and a crash leaves
only ``*.tmp-*`` directories that nothing loads. Nothing is ever changed in place.

Dense index choice per segment: exact ``IndexFlatIP`` below ``hnsw_threshold`` vectors (a linear scan:
about 0.2 ms per 1,000 vectors on one thread, recall 1.0), ``IndexHNSWFlat`` (M=32, efConstruction=80,
efSearch=64, inner product) above it, or, when ``compression="ivfpq"`` and the segment is large,
``IVF{nlist},PQ{dim/8}`` (48 bytes a vector for 384 dimensions instead of 1,536), loadable memory-mapped.
All are wrapped in ``IndexIDMap2`` so results carry chunk ids and vectors can be fetched back by id.
Tombstoned ids are excluded inside the FAISS search (an ``IDSelectorNot`` over them), so a search
still returns k live hits.

BM25 is Lucene's variant (k1=1.5, b=0.75, the same formula bm25s used before) computed at query time
from per-segment postings (term frequencies) and collection statistics summed over the view's segments
(document count, total length and document frequencies, tombstoned documents included until they are
merged away, as in Lucene). So scores do not depend on how the view is cut into segments, and a
one-segment view scores exactly as the former bm25s index did.

Measured HNSW recall against exact search with real all-MiniLM-L6-v2 embeddings of SciFact
chunks and the 1,109 SciFact queries: at 12,739 vectors recall@10 = 0.940 / 0.974 / 0.991 / 0.998
at efSearch 16 / 32 / 64 / 128; at 33,882 vectors recall@10 = 0.984 (efSearch 64) and recall@100 =
0.887 / 0.966 / 0.991 at efSearch 64 / 128 / 256 (FAISS searches with max(efSearch, k), so 64 acts
as 100 there). IVF-PQ recall: docs/benchmarks.md ("Index maintenance at scale").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .analyzer import Analyzer, analyzer_from_spec, get_analyzer
from .errors import IndexLoadError, QueryModelMismatch
from .fusion import rrf
from .language import script_group

DEFAULT_HNSW_THRESHOLD = 50_000
DEFAULT_EF_SEARCH = 64
DEFAULT_NPROBE = 32
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
IVFPQ_MIN_VECTORS = 20_000  # below this, training k-means for the lists costs more than it saves
IVFPQ_TRAIN_VECTORS = 65_536
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 2
SEGMENT_FORMAT = 1
BM25_KIND = "postings-lucene-k1.5-b0.75"
BM25_K1 = 1.5
BM25_B = 0.75
SEGMENTS_DIR = "segments"
MERGE_FACTOR = 4
TIER_BASE = 8
TOMBSTONE_REWRITE_RATIO = 0.3
# Language-bias correction of dense scores (see IndexBundle.dense_search): the share of each script
# group's mean similarity taken off its chunks' scores, and the chunks a group needs before its mean
# says something about the language rather than about a few passages.
LANGUAGE_BIAS_CORRECTION = 0.5
LANGUAGE_GROUP_MIN_CHUNKS = 50

_DENSE_FILE = "dense.faiss"
_DENSE_META = "dense.json"
_SEGMENT_META = "segment.json"
_GROUPS_FILE = "groups.npy"  # per row: rag.language.script_group of its text
_GROUP_SUMS_FILE = "group_sums.npy"  # per group: the sum of its rows' vectors (float64)
_GROUP_COUNT = 2
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_SEGMENT_DIR = re.compile(r"^s\d{6,}-[0-9a-f]+$")


# --------------------------------------------------------------------------------------------
# Dense
# --------------------------------------------------------------------------------------------


def dense_kind_for(count: int, *, hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD, compression: str = "") -> str:
    """The dense index kind a segment of ``count`` vectors gets."""
    if compression == "ivfpq" and count >= IVFPQ_MIN_VECTORS:
        return "ivfpq"
    return "hnsw" if count >= hnsw_threshold else "flat"


class DenseIndex:
    """Inner-product search over L2-normalised float32 vectors, keyed by int64 chunk ids."""

    def __init__(
        self,
        ids: np.ndarray | Sequence[int],
        vectors: np.ndarray,
        *,
        hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD,
        ef_search: int = DEFAULT_EF_SEARCH,
        compression: str = "",
    ) -> None:
        ids_array, matrix = _validate_dense_input(ids, vectors)
        builder = DenseBuilder(int(matrix.shape[1]), dense_kind_for(len(ids_array), hnsw_threshold=hnsw_threshold,
                                                                   compression=compression), ef_search=ef_search)
        builder.add(ids_array, matrix)
        built = builder.finish()
        self._index, self.kind, self.dim, self.ef_search, self.nprobe = (
            built._index, built.kind, built.dim, built.ef_search, built.nprobe)
        self.mmapped = False

    @classmethod
    def _from_faiss(cls, index: Any, kind: str, dim: int, ef_search: int, nprobe: int = DEFAULT_NPROBE,
                    mmapped: bool = False) -> DenseIndex:
        instance = cls.__new__(cls)
        instance._index, instance.kind, instance.dim, instance.ef_search = index, kind, dim, ef_search
        instance.nprobe, instance.mmapped = nprobe, mmapped
        instance._apply_search_params()
        return instance

    @property
    def count(self) -> int:
        return int(self._index.ntotal)

    def nbytes(self) -> int:
        """Approximate resident bytes (memory-mapped codes not counted: they are page cache)."""
        n = self.count
        idmap = n * 24  # the id array and IndexIDMap2's reverse map
        if self.kind == "ivfpq":
            return idmap + (0 if self.mmapped else n * (self.dim // 4 + 8)) + 4 * self.dim * 256 * 2
        codes = 0 if self.mmapped else n * self.dim * 4
        graph = n * HNSW_M * 2 * 4 if self.kind == "hnsw" else 0
        return idmap + codes + graph

    def search(self, query_vec: np.ndarray, k: int, *, exclude: np.ndarray | None = None) -> list[tuple[int, float]]:
        """Top-``k`` (id, inner product), best first; fewer when the index is smaller."""
        return self.search_batch(np.asarray(query_vec, dtype=np.float32).reshape(1, -1), k, exclude=exclude)[0]

    def search_batch(self, query_vecs: np.ndarray, k: int, *, exclude: np.ndarray | None = None
                     ) -> list[list[tuple[int, float]]]:
        queries = np.ascontiguousarray(query_vecs, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (n, {self.dim}), got {queries.shape}")
        live = self.count - (0 if exclude is None else len(exclude))
        k = min(int(k), live)
        if k <= 0:
            return [[] for _ in range(len(queries))]
        if exclude is not None and len(exclude):
            scores, labels = self._index.search(queries, k, params=self._params(exclude))
        else:
            scores, labels = self._index.search(queries, k)
        return [
            [(int(label), float(score)) for score, label in zip(row_scores, row_labels) if label != -1]
            for row_scores, row_labels in zip(scores, labels)
        ]

    def _params(self, exclude: np.ndarray) -> Any:
        import faiss

        batch = faiss.IDSelectorBatch(len(exclude), faiss.swig_ptr(np.ascontiguousarray(exclude, dtype=np.int64)))
        selector = faiss.IDSelectorNot(batch)
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=int(self.ef_search))
        elif self.kind == "ivfpq":
            params = faiss.SearchParametersIVF(sel=selector, nprobe=int(self.nprobe))
        else:
            params = faiss.SearchParameters(sel=selector)
        params._keep = (batch, selector)  # the SWIG objects must outlive the search
        return params

    def vectors(self, ids: Iterable[int]) -> np.ndarray:
        """Stored vectors for ``ids`` (KeyError-like RuntimeError from FAISS for unknown ids); IVF-PQ
        gives the decoded (approximate) vectors."""
        rows = [self._index.reconstruct(int(chunk_id)) for chunk_id in ids]
        return np.vstack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), dtype=np.float32)

    def contains(self, chunk_id: int) -> bool:
        try:
            self._index.reconstruct(int(chunk_id))
        except RuntimeError:
            return False
        return True

    def save(self, directory: str | Path) -> None:
        import faiss

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._index, str(directory / _DENSE_FILE))
        meta = {"kind": self.kind, "dim": self.dim, "count": self.count, "ef_search": self.ef_search,
                "nprobe": self.nprobe, "hnsw_m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION}
        _write_json(directory / _DENSE_META, meta)

    @classmethod
    def load(cls, directory: str | Path, *, ef_search: int | None = None, mmap: bool = False) -> DenseIndex:
        import faiss

        directory = Path(directory)
        meta = _read_json_required(directory / _DENSE_META)
        # Memory-mapping applies to flat codes and IVF lists; HNSW graphs are read into memory.
        use_mmap = mmap and meta["kind"] in ("flat", "ivfpq")
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if use_mmap else 0
        index = faiss.read_index(str(directory / _DENSE_FILE), flags)
        return cls._from_faiss(index, meta["kind"], int(meta["dim"]), ef_search or int(meta["ef_search"]),
                               int(meta.get("nprobe", DEFAULT_NPROBE)), mmapped=use_mmap)

    def _apply_search_params(self) -> None:
        """efSearch and nprobe are not serialised by FAISS; HNSW uses max(efSearch, k) per query."""
        import faiss

        if self.kind == "hnsw":
            faiss.downcast_index(self._index.index).hnsw.efSearch = int(self.ef_search)
        elif self.kind == "ivfpq":
            faiss.extract_index_ivf(self._index.index).nprobe = int(self.nprobe)


class DenseBuilder:
    """Builds one dense index from batches, holding at most the index plus one batch (IVF-PQ also buffers
    its training sample: the first ``IVFPQ_TRAIN_VECTORS`` vectors)."""

    def __init__(self, dim: int, kind: str, *, ef_search: int = DEFAULT_EF_SEARCH, nprobe: int = DEFAULT_NPROBE,
                 expected: int = 0) -> None:
        self.dim, self.kind, self.ef_search, self.nprobe = dim, kind, ef_search, nprobe
        self.expected = expected
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_count = 0
        self._index = None if kind == "ivfpq" else _new_faiss_index(kind, dim)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not len(ids):
            return
        if self._index is None:
            self._pending.append((ids, vectors))
            self._pending_count += len(ids)
            if self._pending_count >= IVFPQ_TRAIN_VECTORS:
                self._train_and_flush()
            return
        self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)

    def _train_and_flush(self) -> None:
        sample = np.vstack([v for _, v in self._pending]).astype(np.float32)
        total = max(self.expected, len(sample))
        self._index = _new_ivfpq_index(self.dim, total, sample)
        pending, self._pending = self._pending, []
        for ids, vectors in pending:
            self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)

    def finish(self) -> DenseIndex:
        if self._index is None:
            if self._pending_count < IVFPQ_MIN_VECTORS:  # too few to train lists on: exact search instead
                self.kind, self._index = "flat", _new_faiss_index("flat", self.dim)
                pending, self._pending = self._pending, []
                for ids, vectors in pending:
                    self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
            else:
                self._train_and_flush()
        return DenseIndex._from_faiss(self._index, self.kind, self.dim, self.ef_search, self.nprobe)


def _validate_dense_input(ids: np.ndarray | Sequence[int], vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids_array = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
    matrix = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError(f"vectors must be a 2-D (n, dim) array, got shape {matrix.shape}")
    if len(ids_array) != len(matrix):
        raise ValueError(f"{len(ids_array)} ids for {len(matrix)} vectors")
    if len(np.unique(ids_array)) != len(ids_array):
        raise ValueError("ids must be unique")
    return ids_array, matrix


def _new_faiss_index(kind: str, dim: int) -> Any:
    import faiss

    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    else:
        inner = faiss.IndexFlatIP(dim)
    return faiss.IndexIDMap2(inner)


def _new_ivfpq_index(dim: int, total: int, sample: np.ndarray) -> Any:
    import faiss

    nlist = int(min(max(64, 4 * math.sqrt(total)), max(64, len(sample) // 39)))
    # dim/4 sub-quantizers of 8 bits: 96 bytes for 384 dimensions (16x smaller than float32); dim/8 lost
    # too much recall (docs/benchmarks.md).
    m = next(d for d in (dim // 4, 96, 64, 48, 32, 24, 16, 12, 8, 4, 2, 1) if d and dim % d == 0)
    quantizer = faiss.IndexFlatIP(dim)
    inner = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    inner.train(np.ascontiguousarray(sample, dtype=np.float32))
    inner.own_fields = True
    quantizer.this.disown()
    return faiss.IndexIDMap2(inner)


# --------------------------------------------------------------------------------------------
# BM25
# --------------------------------------------------------------------------------------------

def bm25_tokenize(text: str, analyzer: Analyzer | None = None) -> list[str]:
    """The BM25 tokenizer (documents and queries alike): ``analyzer`` (see rag/analyzer.py), by
    default the analyzer without a user dictionary."""
    return (analyzer or get_analyzer()).tokenize(text)


@dataclass(frozen=True)
class BM25Stats:
    """Collection statistics of a view: BM25's idf and length normalisation use these, not a segment's own."""

    doc_count: int
    total_length: float
    doc_freq: Callable[[str], int]

    @property
    def avg_length(self) -> float:
        return self.total_length / self.doc_count if self.doc_count else 1.0


class BM25Index:
    """Okapi BM25 postings of one segment: per term, the documents containing it and the term frequency.

    Arrays: ``_ids`` (chunk id per row), ``_doc_len`` (tokens per row), and in CSR layout by term
    ``_indptr`` / ``_rows`` / ``_tfs``; ``_vocab`` maps a token to its term number.

    Queries are tokenized by the analyzer the documents were (recorded in ``bm25.json``). An index
    written by another analyzer loads with ``analyzer_current`` False and answers no query: its
    tokens would not match a query's, so it must be rebuilt rather than searched.
    """

    def __init__(self, ids: np.ndarray | Sequence[int], texts: Sequence[str], *, analyzer: Analyzer | None = None
                 ) -> None:
        ids_array = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if len(ids_array) != len(texts):
            raise ValueError(f"{len(ids_array)} ids for {len(texts)} texts")
        builder = BM25Builder(analyzer=analyzer)
        builder.add(ids_array, texts)
        built = builder.finish()
        self.__dict__.update(built.__dict__)

    @classmethod
    def _from_arrays(cls, ids, doc_len, vocab, indptr, rows, tfs, *, analyzer: Analyzer | None,
                     analyzer_spec: dict[str, Any], mmapped: bool = False) -> BM25Index:
        instance = cls.__new__(cls)
        instance._ids, instance._doc_len, instance._vocab = ids, doc_len, vocab
        instance._indptr, instance._rows, instance._tfs = indptr, rows, tfs
        instance.analyzer, instance.analyzer_spec, instance.mmapped = analyzer, analyzer_spec, mmapped
        return instance

    @property
    def analyzer_current(self) -> bool:
        return self.analyzer is not None

    @property
    def count(self) -> int:
        return len(self._ids)

    @property
    def total_length(self) -> float:
        return float(self._doc_len.sum(dtype=np.float64))

    def doc_freq(self, token: str) -> int:
        term = self._vocab.get(token)
        return 0 if term is None else int(self._indptr[term + 1] - self._indptr[term])

    def stats(self) -> BM25Stats:
        return BM25Stats(self.count, self.total_length, self.doc_freq)

    def nbytes(self) -> int:
        arrays = self._ids.nbytes + self._doc_len.nbytes + self._indptr.nbytes
        postings = 0 if self.mmapped else self._rows.nbytes + self._tfs.nbytes
        return arrays + postings + 100 * len(self._vocab)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """Top-``k`` (id, score) with a positive score; [] when no query term is in the index."""
        if self.analyzer is None:
            return []
        return self.search_tokens(self.analyzer.tokenize(query), k, self.stats())

    def search_tokens(self, tokens: Sequence[str], k: int, stats: BM25Stats, *,
                      exclude_rows: np.ndarray | None = None) -> list[tuple[int, float]]:
        if k <= 0 or not self.count or self.analyzer is None:
            return []
        scores = self.scores(tokens, stats)
        if scores is None:
            return []
        if exclude_rows is not None and len(exclude_rows):
            scores[exclude_rows] = 0.0
        k = min(int(k), len(scores))
        candidates = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        ordered = candidates[np.argsort(-scores[candidates], kind="stable")]
        return [(int(self._ids[row]), float(scores[row])) for row in ordered if scores[row] > 0]

    def scores(self, tokens: Sequence[str], stats: BM25Stats) -> np.ndarray | None:
        """Per-row scores (float32), or None when no query term occurs in this segment. A repeated query
        term counts once per occurrence, as in bm25s."""
        weights = Counter(token for token in tokens if token in self._vocab)
        if not weights:
            return None
        scores = np.zeros(self.count, dtype=np.float32)
        n, norm = stats.doc_count, stats.avg_length
        for token, weight in weights.items():
            term = self._vocab[token]
            start, end = int(self._indptr[term]), int(self._indptr[term + 1])
            rows, tfs = self._rows[start:end], self._tfs[start:end]
            df = stats.doc_freq(token)
            idf = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
            length = self._doc_len[rows]
            scores[rows] += (weight * idf) * tfs / (BM25_K1 * ((1 - BM25_B) + BM25_B * length / norm) + tfs)
        return scores

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("ids", "doc_len", "indptr", "rows", "tfs"):
            np.save(directory / f"bm25_{name}.npy", getattr(self, f"_{name}"))
        tokens = sorted(self._vocab, key=self._vocab.__getitem__)
        (directory / "bm25_vocab.json").write_text(json.dumps(tokens, ensure_ascii=False), encoding="utf-8")
        _write_json(directory / "bm25.json", {"kind": BM25_KIND, "count": self.count, "terms": len(tokens),
                                              "analyzer": self.analyzer_spec})

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = False) -> BM25Index:
        directory = Path(directory)
        meta = _read_json_required(directory / "bm25.json")
        if meta.get("kind") != BM25_KIND:
            raise IndexLoadError(f"BM25 index kind {meta.get('kind')!r} is not {BM25_KIND!r}")
        mode = "r" if mmap else None
        arrays = {name: np.load(directory / f"bm25_{name}.npy", allow_pickle=False,
                                mmap_mode=mode if name in ("rows", "tfs") else None)
                  for name in ("ids", "doc_len", "indptr", "rows", "tfs")}
        tokens = json.loads((directory / "bm25_vocab.json").read_text(encoding="utf-8"))
        vocab = {token: number for number, token in enumerate(tokens)}
        if len(arrays["ids"]) != int(meta["count"]) or len(arrays["indptr"]) != len(vocab) + 1:
            raise IndexLoadError(f"{directory}: BM25 arrays do not match bm25.json")
        spec = meta.get("analyzer") or {"name": "unknown", "version": 0}
        return cls._from_arrays(arrays["ids"], arrays["doc_len"], vocab, arrays["indptr"], arrays["rows"],
                                arrays["tfs"], analyzer=analyzer_from_spec(meta.get("analyzer")),
                                analyzer_spec=spec, mmapped=mmap)


class BM25Builder:
    """Accumulates (term, row, tf) triples batch by batch; memory is the postings, never the texts."""

    def __init__(self, *, analyzer: Analyzer | None = None) -> None:
        self.analyzer = analyzer or get_analyzer()
        self._tokenize = self.analyzer.tokenize
        self._vocab: dict[str, int] = {}
        self._ids: list[np.ndarray] = []
        self._doc_len: list[np.ndarray] = []
        self._terms: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []
        self._tfs: list[np.ndarray] = []
        self._count = 0

    def add(self, ids: np.ndarray, texts: Sequence[str]) -> None:
        terms: list[int] = []
        rows: list[int] = []
        tfs: list[int] = []
        lengths = np.zeros(len(texts), dtype=np.float32)
        vocab = self._vocab
        for offset, text in enumerate(texts):
            tokens = self._tokenize(text)
            lengths[offset] = len(tokens)
            for token, tf in Counter(tokens).items():
                term = vocab.get(token)
                if term is None:
                    term = vocab[token] = len(vocab)
                terms.append(term)
                rows.append(self._count + offset)
                tfs.append(tf)
        self._ids.append(np.asarray(ids, dtype=np.int64))
        self._doc_len.append(lengths)
        self._terms.append(np.asarray(terms, dtype=np.int32))
        self._rows.append(np.asarray(rows, dtype=np.int32))
        self._tfs.append(np.asarray(tfs, dtype=np.float32))
        self._count += len(texts)

    def finish(self) -> BM25Index:
        # Each batch list is dropped as soon as it is concatenated, and each array as soon as it is sorted:
        # at 1M chunks (~30M postings) this keeps the transient to about twice the postings, not four times.
        ids = np.concatenate(self._ids) if self._ids else np.zeros(0, dtype=np.int64)
        doc_len = np.concatenate(self._doc_len) if self._doc_len else np.zeros(0, dtype=np.float32)
        terms = np.concatenate(self._terms) if self._terms else np.zeros(0, dtype=np.int32)
        self._terms = []
        rows = np.concatenate(self._rows) if self._rows else np.zeros(0, dtype=np.int32)
        self._rows = []
        tfs = np.concatenate(self._tfs) if self._tfs else np.zeros(0, dtype=np.float32)
        self._tfs = []
        indptr = np.zeros(len(self._vocab) + 1, dtype=np.int64)
        np.cumsum(np.bincount(terms, minlength=len(self._vocab)), out=indptr[1:])
        order = np.argsort(terms, kind="stable")
        del terms
        rows = np.ascontiguousarray(rows[order])
        tfs = np.ascontiguousarray(tfs[order])
        del order
        return BM25Index._from_arrays(ids, doc_len, dict(self._vocab), indptr, rows, tfs, analyzer=self.analyzer,
                                      analyzer_spec=self.analyzer.spec)


# --------------------------------------------------------------------------------------------
# Segments
# --------------------------------------------------------------------------------------------


@dataclass
class SegmentBatch:
    """One batch of chunks for a segment build: ids, their documents, vectors and texts, row-aligned."""

    ids: np.ndarray
    doc_ids: np.ndarray
    vectors: np.ndarray
    texts: Sequence[str]


class Segment:
    """One loaded immutable segment; shared by every view (version) that names it."""

    def __init__(self, path: Path, meta: dict[str, Any], dense: DenseIndex, bm25: BM25Index, doc_ids: np.ndarray,
                 groups: np.ndarray | None = None, group_sums: np.ndarray | None = None):
        self.path, self.meta, self.dense, self.bm25, self.doc_ids = path, meta, dense, bm25, doc_ids
        # Script group per row and vector sums per group; None for segments written before they were kept.
        self.groups, self.group_sums = groups, group_sums
        self.name = path.name
        self._outside: dict[int, np.ndarray] = {}

    def ids_outside(self, group: int) -> np.ndarray:
        """Sorted ids of the rows not in script ``group`` (computed once per segment, not per query)."""
        if group not in self._outside:
            self._outside[group] = np.sort(self.ids[self.groups != group])
        return self._outside[group]

    @property
    def ids(self) -> np.ndarray:
        return self.bm25._ids

    @property
    def count(self) -> int:
        return self.bm25.count

    def nbytes(self) -> int:
        return self.dense.nbytes() + self.bm25.nbytes() + self.doc_ids.nbytes

    @classmethod
    def load(cls, path: str | Path, *, ef_search: int | None = None, mmap: bool = False) -> Segment:
        path = Path(path)
        meta = _read_json(path / _SEGMENT_META)
        if meta is None or meta.get("format") != SEGMENT_FORMAT:
            raise IndexLoadError(f"{path} is not a complete index segment")
        try:
            dense = DenseIndex.load(path, ef_search=ef_search, mmap=mmap)
            bm25 = BM25Index.load(path, mmap=mmap)
            doc_ids = np.load(path / "docs.npy", allow_pickle=False)
            groups = group_sums = None
            if (path / _GROUPS_FILE).is_file():
                groups = np.load(path / _GROUPS_FILE, allow_pickle=False)
                group_sums = np.load(path / _GROUP_SUMS_FILE, allow_pickle=False)
        except IndexLoadError:
            raise
        except Exception as exc:
            raise IndexLoadError(f"{path}: {type(exc).__name__}: {exc}") from exc
        count = int(meta["count"])
        if dense.count != count or bm25.count != count or len(doc_ids) != count:
            raise IndexLoadError(f"{path}: segment count {count}, dense {dense.count}, bm25 {bm25.count}, "
                                 f"documents {len(doc_ids)}")
        if dense.dim != int(meta["dim"]):
            raise IndexLoadError(f"{path}: segment dim {meta['dim']}, dense {dense.dim}")
        if groups is not None and (len(groups) != count or group_sums.shape != (_GROUP_COUNT, dense.dim)):
            raise IndexLoadError(f"{path}: language groups do not match the segment")
        return cls(path, meta, dense, bm25, doc_ids, groups, group_sums)


def segments_root(root: str | Path) -> Path:
    return Path(root) / SEGMENTS_DIR


def write_segment(
    root: str | Path,
    prefix: str,
    batches: Iterable[SegmentBatch],
    *,
    dim: int,
    expected: int = 0,
    hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD,
    ef_search: int = DEFAULT_EF_SEARCH,
    compression: str = "",
    analyzer: Analyzer | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write one segment from ``batches`` and return its ``segment.json`` (with ``name``).

    Streams: memory is the dense index and postings being built plus one batch. The name is
    ``prefix`` plus a digest of the content, so writing the same content again (a re-delivered task)
    finds the finished segment and changes nothing. ``expected`` (the number of chunks to come)
    chooses the dense kind; a wrong guess only costs speed.
    """
    seg_root = segments_root(root)
    seg_root.mkdir(parents=True, exist_ok=True)
    kind = dense_kind_for(expected, hnsw_threshold=hnsw_threshold, compression=compression)
    dense = DenseBuilder(dim, kind, ef_search=ef_search, expected=expected)
    bm25 = BM25Builder(analyzer=analyzer)
    digest = hashlib.sha256(prefix.encode() + b"\0" + json.dumps(bm25.analyzer.spec, sort_keys=True).encode()
                            + b"\0groups-v1")
    doc_parts: list[np.ndarray] = []
    group_parts: list[np.ndarray] = []
    group_sums = np.zeros((_GROUP_COUNT, dim), dtype=np.float64)
    seen = 0
    for batch in batches:
        ids, matrix = _validate_dense_input(batch.ids, batch.vectors)
        if matrix.shape[1] != dim:
            raise ValueError(f"vectors have dimension {matrix.shape[1]}, the segment {dim}")
        if len(batch.texts) != len(ids) or len(batch.doc_ids) != len(ids):
            raise ValueError("a segment batch needs one text and one document id per id")
        digest.update(ids.astype("<i8").tobytes())
        digest.update(matrix.astype("<f4").tobytes())
        for text in batch.texts:
            digest.update(text.encode("utf-8") + b"\0")
        dense.add(ids, matrix)
        bm25.add(ids, batch.texts)
        doc_parts.append(np.asarray(batch.doc_ids, dtype=np.int64))
        groups = np.fromiter((script_group(text) for text in batch.texts), dtype=np.uint8, count=len(ids))
        group_parts.append(groups)
        for group in range(_GROUP_COUNT):
            group_sums[group] += matrix[groups == group].sum(axis=0, dtype=np.float64)
        seen += len(ids)
        if on_batch is not None:
            on_batch(len(ids))
    sha = digest.hexdigest()
    name = f"{prefix}-{sha[:12]}"
    final = seg_root / name
    existing = _read_json(final / _SEGMENT_META)
    if existing is not None and existing.get("content_sha256") == sha:
        return existing
    built_dense, built_bm25 = dense.finish(), bm25.finish()
    if len(np.unique(built_bm25._ids)) != len(built_bm25._ids):
        raise ValueError("ids must be unique within a segment")
    meta = {"format": SEGMENT_FORMAT, "name": name, "count": seen, "dim": dim, "dense_kind": built_dense.kind,
            "bm25_kind": BM25_KIND, "content_sha256": sha, "analyzer": bm25.analyzer.spec,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    tmp = seg_root / f"{name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        built_dense.save(tmp)
        built_bm25.save(tmp)
        np.save(tmp / "docs.npy", np.concatenate(doc_parts) if doc_parts else np.zeros(0, dtype=np.int64))
        np.save(tmp / _GROUPS_FILE, np.concatenate(group_parts) if group_parts else np.zeros(0, dtype=np.uint8))
        np.save(tmp / _GROUP_SUMS_FILE, group_sums)
        _write_json(tmp / _SEGMENT_META, meta)
        _fsync_tree(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if _read_json(final / _SEGMENT_META) is None:  # a torn leftover under the final name
                graveyard = final.with_name(f"{final.name}.tmp-old-{secrets.token_hex(6)}")
                os.rename(final, graveyard)
                os.rename(tmp, final)
                shutil.rmtree(graveyard, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _fsync_path(seg_root)
    return meta


def list_segments(root: str | Path) -> list[str]:
    seg_root = segments_root(root)
    if not seg_root.is_dir():
        return []
    return sorted(e.name for e in seg_root.iterdir() if _SEGMENT_DIR.match(e.name) and (e / _SEGMENT_META).is_file())


def delete_unreferenced_segments(root: str | Path, referenced: set[str], *, older_than_s: float) -> list[str]:
    """Remove segments no version names, if older than ``older_than_s`` (a build in progress has written
    its segment but not yet the version that names it)."""
    cutoff = time.time() - older_than_s
    removed = []
    for name in list_segments(root):
        path = segments_root(root) / name
        if name in referenced or path.stat().st_mtime >= cutoff:
            continue
        graveyard = path.with_name(f"{name}.tmp-del-{secrets.token_hex(6)}")
        os.rename(path, graveyard)
        shutil.rmtree(graveyard, ignore_errors=True)
        removed.append(name)
    return removed


def plan_merge(segments: Sequence[dict[str, Any]], *, merge_factor: int = MERGE_FACTOR,
               tier_base: int = TIER_BASE, rewrite_ratio: float = TOMBSTONE_REWRITE_RATIO) -> list[str]:
    """Names of the segments to merge into one now ([] for none). ``segments``: [{"name", "count", "tombstones"}].

    Size tiers of factor ``tier_base`` by live count; when a tier holds ``merge_factor`` segments the
    lowest such tier is merged (log-structured: each chunk is rewritten once per tier). A segment whose
    tombstones exceed ``rewrite_ratio`` of it is rewritten (alone or with its tier) to reclaim space.
    """
    tiers: dict[int, list[str]] = {}
    heavy: list[str] = []
    for segment in segments:
        live = max(int(segment["count"]) - int(segment.get("tombstones", 0)), 0)
        if int(segment["count"]) and int(segment.get("tombstones", 0)) > rewrite_ratio * int(segment["count"]):
            heavy.append(segment["name"])
        tier = int(math.log(max(live, 1), tier_base))
        tiers.setdefault(tier, []).append(segment["name"])
    for tier in sorted(tiers):
        if len(tiers[tier]) >= merge_factor:
            return tiers[tier]
    return heavy[:1]


# --------------------------------------------------------------------------------------------
# Versions (views) on disk
# --------------------------------------------------------------------------------------------


def version_dirname(version: int) -> str:
    if version < 0:
        raise ValueError("version must be >= 0")
    return f"v{version:06d}"


@dataclass
class ViewSegment:
    """A segment as one version sees it: its name and the chunk ids deleted from it since it was written."""

    name: str
    tombstones: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def write_view(
    root: str | Path,
    version: int,
    segments: Sequence[ViewSegment],
    *,
    meta: dict[str, Any],
    arrays: dict[str, np.ndarray] | None = None,
    dim: int | None = None,
    fields: dict[str, Any] | None = None,
) -> Path:
    """Write version ``version`` as a view over existing segments, atomically; returns its directory.

    ``meta`` is free-form and extensible: every producer adds its own fields (model, analyzer, ...);
    ``arrays`` are extra named arrays kept beside the manifest (``read_view_array``); ``fields`` are extra
    top-level manifest fields (the analyzer's, the embedding model's), checked by their owners. Idempotent like
    segments: the same content again is reused untouched; different content replaces it in one rename.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    seg_metas = []
    for segment in segments:
        seg_meta = _read_json(segments_root(root) / segment.name / _SEGMENT_META)
        if seg_meta is None:
            raise IndexLoadError(f"segment {segment.name} does not exist under {root}")
        seg_metas.append(seg_meta)
    tombstones = [np.unique(np.asarray(s.tombstones, dtype=np.int64)) for s in segments]
    arrays = {name: np.asarray(value) for name, value in (arrays or {}).items()}
    manifest = _view_manifest(version, seg_metas, tombstones, meta, arrays, dim)
    manifest.update(json.loads(json.dumps(fields or {})))
    final = root / version_dirname(version)
    if _same_content(_read_json(final / MANIFEST_NAME), manifest):
        return final
    tmp = root / f"{final.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        for seg_meta, tomb in zip(seg_metas, tombstones):
            if len(tomb):
                np.save(tmp / f"tomb-{seg_meta['name']}.npy", tomb)
        for name, value in arrays.items():
            np.save(tmp / f"array-{name}.npy", value)
        _write_json(tmp / MANIFEST_NAME, manifest)
        _fsync_tree(tmp)
        _install(tmp, final, manifest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _fsync_path(root)
    return final


def _view_manifest(version: int, seg_metas: list[dict], tombstones: list[np.ndarray], meta: dict[str, Any],
                   arrays: dict[str, np.ndarray], dim: int | None) -> dict[str, Any]:
    digest = hashlib.sha256()
    entries = []
    for seg_meta, tomb in zip(seg_metas, tombstones):
        digest.update(seg_meta["content_sha256"].encode() + b"\0")
        digest.update(tomb.astype("<i8").tobytes() + b"\1")
        entries.append({"name": seg_meta["name"], "count": int(seg_meta["count"]), "tombstones": int(len(tomb)),
                        "dense_kind": seg_meta["dense_kind"]})
    for name in sorted(arrays):
        digest.update(name.encode() + b"\0" + np.ascontiguousarray(arrays[name]).tobytes())
    dims = {int(m["dim"]) for m in seg_metas} | ({int(dim)} if dim else set())
    kinds = [e["dense_kind"] for e in sorted(entries, key=lambda e: -e["count"])]
    return {
        "format": MANIFEST_FORMAT,
        "version": int(version),
        "count": int(sum(e["count"] - e["tombstones"] for e in entries)),
        "dim": dims.pop() if len(dims) == 1 else (None if not dims else -1),  # -1: mixed, refused on load
        "model_id": meta.get("model_id"),
        "dense_kind": kinds[0] if kinds else "flat",
        "bm25_kind": BM25_KIND,
        "segments": entries,
        "arrays": sorted(arrays),
        "content_sha256": digest.hexdigest(),
        "meta": json.loads(json.dumps(meta)),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """A version's manifest, or None when the directory is not a complete version of this format."""
    manifest = _read_json(Path(path) / MANIFEST_NAME)
    return manifest if manifest is not None and manifest.get("format") == MANIFEST_FORMAT else None


def read_view_array(path: str | Path, name: str) -> np.ndarray | None:
    file = Path(path) / f"array-{name}.npy"
    return np.load(file, allow_pickle=False) if file.is_file() else None


def read_view_tombstones(path: str | Path, segment: str) -> np.ndarray:
    file = Path(path) / f"tomb-{segment}.npy"
    return np.load(file, allow_pickle=False) if file.is_file() else np.zeros(0, dtype=np.int64)


def write_index_version(
    root: str | Path,
    version: int,
    *,
    ids: np.ndarray | Sequence[int],
    vectors: np.ndarray,
    texts: Sequence[str],
    meta: dict[str, Any],
    doc_ids: np.ndarray | Sequence[int] | None = None,
    hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD,
    ef_search: int = DEFAULT_EF_SEARCH,
    compression: str = "",
    arrays: dict[str, np.ndarray] | None = None,
    analyzer: Analyzer | None = None,
) -> Path:
    """Write version ``version`` from scratch: one segment with everything, and a view of it.

    Idempotent: the same content again reuses the segment and the version untouched (a re-delivered
    Celery task is harmless); different content under the same version number replaces the version
    in one rename. ``meta`` must be JSON-serialisable and should carry ``model_id`` and ``embedding``
    (``BaseEmbedder.describe()``: model, model_id, dimension, backend), recorded in the manifest so that a
    loader refuses to search the version with another model's query vectors. ``analyzer``
    (default: no user dictionary) tokenizes for BM25; its name, version and dictionary hash are
    recorded in the manifest.
    """
    analyzer = analyzer or get_analyzer()
    ids_array, matrix = _validate_dense_input(ids, vectors)
    if len(texts) != len(ids_array):
        raise ValueError(f"{len(texts)} texts for {len(ids_array)} ids")
    docs = np.zeros(len(ids_array), dtype=np.int64) if doc_ids is None else np.asarray(doc_ids, dtype=np.int64)
    segments = []
    if len(ids_array):
        seg = write_segment(root, f"s{version:06d}", [SegmentBatch(ids_array, docs, matrix, texts)],
                            dim=int(matrix.shape[1]), expected=len(ids_array), hnsw_threshold=hnsw_threshold,
                            ef_search=ef_search, compression=compression, analyzer=analyzer)
        segments.append(ViewSegment(seg["name"]))
    return write_view(root, version, segments, meta=meta, arrays=arrays, dim=int(matrix.shape[1]),
                      fields={**analyzer_manifest(analyzer), **embedding_manifest(meta, int(matrix.shape[1]))})


def embedding_manifest(meta: dict[str, Any], dim: int) -> dict[str, Any]:
    """The manifest field that records the embedding model of a version: ``{"embedding": {model, model_id,
    dimension, backend}}`` from ``meta["embedding"]`` (or just ``meta["model_id"]``)."""
    record = dict(meta.get("embedding") or {})
    record.setdefault("model_id", meta.get("model_id"))
    if record.get("dimension") not in (None, dim):
        raise ValueError(f"embedding dimension {record['dimension']} but vectors have {dim}")
    record["dimension"] = dim
    return {"embedding": json.loads(json.dumps(record))}


def analyzer_manifest(analyzer: Analyzer) -> dict[str, Any]:
    """The manifest fields that record a version's BM25 analyzer."""
    return {"analyzer": {"name": analyzer.name, "version": analyzer.version},
            "user_dictionary_sha256": analyzer.dictionary_hash}


_analyzer_manifest = analyzer_manifest


def manifest_analyzer_matches(manifest: dict[str, Any] | None, analyzer: Analyzer) -> bool:
    """True when a version's manifest records ``analyzer`` (same name, version and dictionary)."""
    if not manifest:
        return False
    return manifest.get("analyzer") == {"name": analyzer.name, "version": analyzer.version} \
        and manifest.get("user_dictionary_sha256") == analyzer.dictionary_hash


def _same_content(existing: dict[str, Any] | None, manifest: dict[str, Any]) -> bool:
    if existing is None:
        return False
    return {k: v for k, v in existing.items() if k != "created"} == {
        k: v for k, v in manifest.items() if k != "created"
    }


def _install(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Move ``tmp`` to ``final``; a concurrent writer of the same content wins harmlessly."""
    try:
        os.rename(tmp, final)
        return
    except OSError:
        if not final.exists():
            raise
    if _same_content(_read_json(final / MANIFEST_NAME), manifest):
        return
    if not _exchange(tmp, final):
        graveyard = final.with_name(f"{final.name}.tmp-old-{secrets.token_hex(6)}")
        os.rename(final, graveyard)
        os.rename(tmp, final)
        shutil.rmtree(graveyard, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange)
    return result == 0


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync_path(path)
    _fsync_path(directory)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True), encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_json_required(path: Path) -> dict[str, Any]:
    value = _read_json(path)
    if value is None:
        raise IndexLoadError(f"missing or unreadable {path}")
    return value


def list_versions(root: str | Path) -> list[int]:
    """Complete versions under ``root`` (directories named ``vNNNNNN`` with a manifest), ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    versions = []
    for entry in root.iterdir():
        match = _VERSION_DIR.match(entry.name)
        if match and (entry / MANIFEST_NAME).is_file():
            versions.append(int(match.group(1)))
    return sorted(versions)


def delete_version(root: str | Path, version: int) -> bool:
    """Remove a version (its manifest and tombstones; the segments it named stay while other versions name
    them): renamed out of sight first, so a concurrent loader sees all or nothing."""
    final = Path(root) / version_dirname(version)
    if not final.exists():
        return False
    graveyard = final.with_name(f"{final.name}.tmp-del-{secrets.token_hex(6)}")
    os.rename(final, graveyard)
    shutil.rmtree(graveyard, ignore_errors=True)
    return True


def referenced_segments(root: str | Path) -> set[str]:
    """Segments named by any complete version under ``root``."""
    names: set[str] = set()
    for version in list_versions(root):
        manifest = read_manifest(Path(root) / version_dirname(version))
        if manifest is not None:
            names.update(entry["name"] for entry in manifest.get("segments", []))
    return names


def remove_stale_tmp(root: str | Path, older_than_s: float = 3600.0) -> list[Path]:
    """Delete ``*.tmp-*`` leftovers of crashed writers older than ``older_than_s`` seconds."""
    root = Path(root)
    removed: list[Path] = []
    for directory in (root, segments_root(root)):
        if not directory.is_dir():
            continue
        cutoff = time.time() - older_than_s
        for entry in directory.iterdir():
            if ".tmp-" in entry.name and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


# --------------------------------------------------------------------------------------------
# Loaded views
# --------------------------------------------------------------------------------------------


class SegmentCache:
    """Loaded segments by path, held weakly: a segment lives while some loaded view uses it, so two
    versions of a base that share segments share their memory, and a swap loads only what is new."""

    def __init__(self) -> None:
        self._segments: weakref.WeakValueDictionary[str, Segment] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def get(self, path: Path, *, ef_search: int | None, mmap: bool) -> tuple[Segment, bool]:
        key = f"{path}|{mmap}"
        with self._lock:
            segment = self._segments.get(key)
        if segment is not None:
            return segment, False
        segment = Segment.load(path, ef_search=ef_search, mmap=mmap)
        with self._lock:
            return self._segments.setdefault(key, segment), True


_SHARED_SEGMENTS = SegmentCache()


class _ViewSegment:
    __slots__ = ("segment", "tombstones", "tomb_rows")

    def __init__(self, segment: Segment, tombstones: np.ndarray):
        self.segment, self.tombstones = segment, tombstones
        if len(tombstones):
            rows = np.flatnonzero(np.isin(segment.ids, tombstones, assume_unique=True))
        else:
            rows = np.zeros(0, dtype=np.int64)
        self.tomb_rows = rows


def _group_means(parts: list[_ViewSegment]) -> np.ndarray | None:
    """Mean vector per script group over the view's segments (rows deleted since their segment was
    written still count: a mean, not an exact figure), or None when a segment has no groups or a group
    has fewer than LANGUAGE_GROUP_MIN_CHUNKS chunks."""
    if not parts or any(p.segment.groups is None for p in parts):
        return None
    counts = np.zeros(_GROUP_COUNT, dtype=np.int64)
    sums = np.zeros_like(parts[0].segment.group_sums)
    for part in parts:
        counts += np.bincount(part.segment.groups, minlength=_GROUP_COUNT)[:_GROUP_COUNT]
        sums += part.segment.group_sums
    if counts.min() < LANGUAGE_GROUP_MIN_CHUNKS:
        return None
    return (sums / counts[:, None]).astype(np.float32)


@dataclass
class IndexBundle:
    """One loaded, read-only index version: a view over segments (dense + BM25 each) minus tombstones.

    Safe to share across threads; every search on one bundle sees exactly one version.
    """

    path: Path
    version: int
    manifest: dict[str, Any]
    parts: list[_ViewSegment]
    loaded_segments: int = 0  # segments this load read from disk (the rest were shared with loaded views)
    # Mean vector per script group when the dense search corrects the language bias, else None.
    group_means: np.ndarray | None = None

    @classmethod
    def load(cls, path: str | Path, *, ef_search: int | None = None, mmap: bool = False,
             cache: SegmentCache | None = None) -> IndexBundle:
        """Load a version directory; raises :class:`IndexLoadError` if it is not a complete version."""
        path = Path(path)
        if ".tmp-" in path.name:
            raise IndexLoadError(f"{path} is a temporary directory, not an index version")
        manifest = _read_json(path / MANIFEST_NAME)
        if manifest is None:
            raise IndexLoadError(f"{path} has no readable {MANIFEST_NAME}")
        if manifest.get("format") != MANIFEST_FORMAT:
            raise IndexLoadError(f"{path}: unsupported manifest format {manifest.get('format')!r}")
        cache = cache or _SHARED_SEGMENTS
        parts, loaded = [], 0
        try:
            for entry in manifest.get("segments", []):
                segment, fresh = cache.get(segments_root(path.parent) / entry["name"], ef_search=ef_search, mmap=mmap)
                loaded += fresh
                tombstones = read_view_tombstones(path, entry["name"])
                if len(tombstones) != int(entry.get("tombstones", 0)) or segment.count != int(entry["count"]):
                    raise IndexLoadError(f"{path}: segment {entry['name']} does not match the manifest")
                parts.append(_ViewSegment(segment, tombstones))
        except IndexLoadError:
            raise
        except Exception as exc:
            raise IndexLoadError(f"{path}: {type(exc).__name__}: {exc}") from exc
        bundle = cls(path=path, version=int(manifest["version"]), manifest=manifest, parts=parts,
                     loaded_segments=loaded)
        bundle._check_consistency()
        bundle.group_means = _group_means(parts)
        return bundle

    def _check_consistency(self) -> None:
        expected = int(self.manifest["count"])
        live = sum(p.segment.count - len(p.tomb_rows) for p in self.parts)
        if live != expected:
            raise IndexLoadError(f"{self.path}: manifest count {expected}, segments hold {live} live chunks")
        dims = {p.segment.dense.dim for p in self.parts}
        if len(dims) > 1 or (dims and self.manifest.get("dim") not in dims):
            raise IndexLoadError(f"{self.path}: manifest dim {self.manifest.get('dim')}, segments {sorted(dims)}")
        recorded = (self.manifest.get("embedding") or {}).get("dimension")
        if recorded is not None and dims and int(recorded) not in dims:
            raise IndexLoadError(f"{self.path}: embedding dimension {recorded}, segments {sorted(dims)}")

    @property
    def model_id(self) -> str | None:
        return self.manifest.get("model_id")

    @property
    def embedding(self) -> dict[str, Any]:
        """The model that built the dense index: model (catalog key), model_id, dimension, backend.
        Versions written before this was recorded carry only ``model_id``."""
        return self.manifest.get("embedding") or {"model_id": self.model_id, "dimension": self.dim}

    def check_query_model(self, model_id: str | None) -> None:
        """Raise :class:`QueryModelMismatch` unless query vectors of ``model_id`` may search this version."""
        if not model_id or model_id != self.model_id:
            raise QueryModelMismatch(f"{self.path}: built with {self.model_id!r}, query encoder is {model_id!r}")

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.get("meta", {})

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest.get("dim") or 0)

    @property
    def dense(self) -> DenseIndex | None:
        """The largest segment's dense index (diagnostics)."""
        return max(self.parts, key=lambda p: p.segment.count).segment.dense if self.parts else None

    @property
    def bm25(self) -> BM25Index | None:
        """The largest segment's BM25 postings (diagnostics; every segment of a view has one analyzer)."""
        return max(self.parts, key=lambda p: p.segment.count).segment.bm25 if self.parts else None

    @property
    def segments(self) -> list[Segment]:
        return [p.segment for p in self.parts]

    def nbytes(self) -> int:
        return sum(p.segment.nbytes() for p in self.parts)

    def live_ids(self, segment_name: str) -> np.ndarray:
        """Chunk ids of one segment that this view still serves (for merges)."""
        for part in self.parts:
            if part.segment.name == segment_name:
                return np.delete(part.segment.ids, part.tomb_rows)
        raise KeyError(segment_name)

    def tombstones(self, segment_name: str) -> np.ndarray:
        for part in self.parts:
            if part.segment.name == segment_name:
                return part.tombstones
        raise KeyError(segment_name)

    def dense_search(self, query_vec: np.ndarray, k: int, *, model_id: str | None = None) -> list[tuple[int, float]]:
        """``model_id``: the query encoder's; given, a version built with another model is refused.

        In a version that holds enough CJK and enough other chunks (``group_means``), each script group
        is searched on its own and its scores are lowered by LANGUAGE_BIAS_CORRECTION times the query's
        similarity to the group's mean vector (the mean of the query's similarities to its chunks). A
        multilingual encoder scores any passage in the question's language above passages in another
        language; this takes half of that offset away, so an English question can reach a Chinese
        passage and the other way round (Debian zh set, multilingual-e5-small: cross-lingual dense hit@3
        0.25 -> 0.42, same-language unchanged; docs/benchmarks.md)."""
        if model_id is not None:
            self.check_query_model(model_id)
        if self.group_means is None:
            hits = self._dense_hits(query_vec, k, None)
        else:
            query = np.asarray(query_vec, dtype=np.float32).reshape(-1)
            hits = []
            for group, mean in enumerate(self.group_means):
                offset = LANGUAGE_BIAS_CORRECTION * float(query @ mean)
                hits += [(chunk_id, score - offset) for chunk_id, score in self._dense_hits(query, k, group)]
        hits.sort(key=lambda hit: (-hit[1], hit[0]))
        return hits[:k]

    def _dense_hits(self, query_vec: np.ndarray, k: int, group: int | None) -> list[tuple[int, float]]:
        hits: list[tuple[int, float]] = []
        for part in self.parts:
            exclude = part.tombstones
            if group is not None:
                others = part.segment.ids_outside(group)
                exclude = np.union1d(exclude, others) if len(exclude) else others
            hits += part.segment.dense.search(query_vec, k, exclude=exclude if len(exclude) else None)
        return hits

    def bm25_stats(self, tokens: Sequence[str]) -> BM25Stats:
        doc_count = sum(p.segment.count for p in self.parts)
        total = sum(p.segment.bm25.total_length for p in self.parts)
        freqs = {token: sum(p.segment.bm25.doc_freq(token) for p in self.parts) for token in set(tokens)}
        return BM25Stats(doc_count, total, lambda token: freqs.get(token, 0))

    @property
    def analyzer_current(self) -> bool:
        """False when BM25 was built by an analyzer this code cannot reproduce: rebuild the version."""
        return all(p.segment.bm25.analyzer_current for p in self.parts)

    def bm25_search(self, query: str, k: int) -> list[tuple[int, float]]:
        if k <= 0 or not self.parts or not self.analyzer_current:
            return []
        tokens = self.parts[0].segment.bm25.analyzer.tokenize(query)
        if not tokens:
            return []
        stats = self.bm25_stats(tokens)
        hits: list[tuple[int, float]] = []
        for part in self.parts:
            hits += part.segment.bm25.search_tokens(tokens, k, stats, exclude_rows=part.tomb_rows)
        hits.sort(key=lambda hit: (-hit[1], hit[0]))
        return hits[:k]

    def vectors(self, ids: Iterable[int]) -> np.ndarray:
        rows = []
        for chunk_id in ids:
            for part in reversed(self.parts):  # the newest segment holds the current copy of an id
                if part.segment.dense.contains(chunk_id) and not np.isin(chunk_id, part.tombstones):
                    rows.append(part.segment.dense.vectors([chunk_id]))
                    break
            else:
                raise KeyError(chunk_id)
        return np.vstack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), dtype=np.float32)

    def hybrid_search(
        self, query: str, query_vec: np.ndarray, *, k: int = 10, candidates: int = 100, rrf_k: int = 60
    ) -> list[tuple[int, float]]:
        """RRF of the dense and BM25 top-``candidates``; returns the fused top-``k``."""
        fused = rrf([self.dense_search(query_vec, candidates), self.bm25_search(query, candidates)], k=rrf_k)
        return fused[:k]


@dataclass
class ViewLayout:
    """What a builder needs of a version without loading its indexes: per segment the chunk ids, their
    documents and the tombstones (memory-mapped arrays), plus the version's manifest and arrays."""

    path: Path
    manifest: dict[str, Any]
    segments: list[dict[str, Any]]  # {"name", "count", "ids", "doc_ids", "tombstones"}

    @classmethod
    def read(cls, path: str | Path) -> ViewLayout:
        path = Path(path)
        manifest = read_manifest(path)
        if manifest is None:
            raise IndexLoadError(f"{path} is not a complete index version of format {MANIFEST_FORMAT}")
        segments = []
        try:
            for entry in manifest.get("segments", []):
                seg_path = segments_root(path.parent) / entry["name"]
                segments.append({
                    "name": entry["name"], "count": int(entry["count"]),
                    "ids": np.load(seg_path / "bm25_ids.npy", mmap_mode="r", allow_pickle=False),
                    "doc_ids": np.load(seg_path / "docs.npy", mmap_mode="r", allow_pickle=False),
                    "tombstones": read_view_tombstones(path, entry["name"]),
                })
        except (OSError, ValueError) as exc:
            raise IndexLoadError(f"{path}: {type(exc).__name__}: {exc}") from exc
        return cls(path, manifest, segments)

    def array(self, name: str) -> np.ndarray | None:
        return read_view_array(self.path, name)

    def live_ids(self, name: str) -> np.ndarray:
        segment = next(s for s in self.segments if s["name"] == name)
        ids = np.asarray(segment["ids"])
        return ids[~np.isin(ids, segment["tombstones"])] if len(segment["tombstones"]) else ids.copy()
