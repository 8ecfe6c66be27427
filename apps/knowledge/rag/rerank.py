"""Optional second-stage reranking of retrieved passages.

No reranker model is bundled and nothing is downloaded: a cross-encoder is used only when an
operator points ``load_reranker`` at a local sentence-transformers CrossEncoder directory.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .errors import RerankerUnavailable


@runtime_checkable
class Reranker(Protocol):
    """Scores passages for a query; higher is more relevant. One score per passage, same order."""

    def rerank(self, query: str, passages: list[str]) -> list[float]: ...


class CrossEncoderReranker:
    """A local ``sentence_transformers.CrossEncoder``; the path is checked now, the model loads lazily."""

    def __init__(self, path: str | os.PathLike[str], *, batch_size: int = 16, device: str = "cpu",
                 max_length: int = 512) -> None:
        self.path = str(path)
        if not Path(self.path).is_dir() or not (Path(self.path) / "config.json").is_file():
            raise RerankerUnavailable(
                f"reranker model not found at {self.path!r}: expected a local CrossEncoder directory with "
                "config.json (models are never downloaded at run time)"
            )
        self.batch_size = batch_size
        self.device = device
        self.max_length = max_length
        self._model: Any = None
        self._model_pid: int | None = None
        self._lock = threading.Lock()

    def rerank(self, query: str, passages: list[str]) -> list[float]:
        if not passages:
            return []
        scores = self._loaded().predict(
            [(query, passage) for passage in passages],
            batch_size=self.batch_size,
            show_progress_bar=False,
            convert_to_numpy=True,
        )
        return [float(score) for score in scores]

    def _loaded(self) -> Any:
        if self._model is None or self._model_pid != os.getpid():
            with self._lock:
                if self._model is None or self._model_pid != os.getpid():
                    os.environ["HF_HUB_OFFLINE"] = "1"
                    os.environ["TRANSFORMERS_OFFLINE"] = "1"
                    from sentence_transformers import CrossEncoder

                    self._model = CrossEncoder(
                        self.path, device=self.device, max_length=self.max_length, local_files_only=True
                    )
                    self._model_pid = os.getpid()
        return self._model


def load_reranker(path: str | os.PathLike[str] | None) -> Reranker | None:
    """``None`` when no path is configured; raises :class:`RerankerUnavailable` for a missing path."""
    if path is None or not str(path).strip():
        return None
    return CrossEncoderReranker(path)


def rerank_results(
    reranker: Reranker, query: str, results: Sequence[tuple[int, str]], top_k: int | None = None
) -> list[tuple[int, float]]:
    """Reorder ``(id, passage)`` pairs by reranker score, best first (stable for equal scores)."""
    if not results:
        return []
    scores = reranker.rerank(query, [passage for _, passage in results])
    if len(scores) != len(results):
        raise ValueError(f"reranker returned {len(scores)} scores for {len(results)} passages")
    order = sorted(range(len(results)), key=lambda i: -scores[i])
    ranked = [(results[i][0], float(scores[i])) for i in order]
    return ranked if top_k is None else ranked[:top_k]
