"""The process's embedding model and the stored-embedding reuse (keyed by model id and content hash).

A chunk's vector depends only on its text and the model, so any chunk ever stored with the same
(model_id, content_hash) supplies it: re-ingesting an unchanged document, changing one paragraph of
a long one, or rebuilding an index encodes only text the database has never seen.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from django.conf import settings

from .metrics import embeddings_total
from .models import Chunk
from .rag.embedder import Embedder, get_embedder

# SQLite caps bound parameters per query (999 on old builds); stay well under it.
_LOOKUP_BATCH = 500


def embedder() -> Embedder:
    """The shared model of this process. Loaded lazily on first encode, never at import."""
    return get_embedder(settings.EMBEDDING_MODEL_PATH or None, batch_size=settings.EMBEDDING_BATCH_SIZE)


def vector_to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def vector_from_bytes(data: bytes | memoryview) -> np.ndarray:
    return np.frombuffer(bytes(data), dtype="<f4")


def stored_vectors(model_id: str, hashes: Iterable[str]) -> dict[str, np.ndarray]:
    """Vectors already stored for these content hashes under `model_id`."""
    wanted = sorted(set(hashes))
    found: dict[str, np.ndarray] = {}
    for start in range(0, len(wanted), _LOOKUP_BATCH):
        batch = wanted[start:start + _LOOKUP_BATCH]
        rows = (Chunk.objects.filter(embedding_model=model_id, content_hash__in=batch, embedding__isnull=False)
                .values_list("content_hash", "embedding"))
        for content_hash, data in rows:
            if content_hash not in found:
                found[content_hash] = vector_from_bytes(data)
    return found


def vectors_for(texts: Sequence[str], hashes: Sequence[str], *, model: Embedder | None = None
                ) -> tuple[np.ndarray, set[str]]:
    """Vectors (len(texts), dim) for texts whose sha256 hashes are given, and the hashes that were encoded.

    Stored vectors are reused; each distinct missing text is encoded once, in large batches.
    """
    model = model or embedder()
    vectors = np.zeros((len(texts), model.dim), dtype=np.float32)
    if not texts:
        return vectors, set()
    known = stored_vectors(model.model_id, hashes)
    missing: dict[str, str] = {}
    for text, content_hash in zip(texts, hashes):
        if content_hash not in known and content_hash not in missing:
            missing[content_hash] = text
    if missing:
        encoded = model.encode(list(missing.values()))
        known.update(zip(missing.keys(), encoded))
    for row, content_hash in enumerate(hashes):
        vectors[row] = known[content_hash]
    embeddings_total.labels(source="encoded").inc(len(missing))
    embeddings_total.labels(source="reused").inc(len(texts) - len(missing))
    return vectors, set(missing)
