"""Fixtures for the pure-Python RAG tests: no Django, no database, the real bundled embedding model."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parents[3]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Overrides the project-wide autouse fixture of the same name (it clears Django's cache): these
    tests run without Django (``-p no:django``) and touch no cache."""
    yield


@pytest.fixture(autouse=True)
def _isolated_process_state():
    """Overrides the project-wide autouse fixture of the same name (it needs pytest-django's
    ``settings``): the RAG core keeps no Django-side process state."""
    yield


@pytest.fixture(scope="session")
def embedder():
    from apps.knowledge.rag.embedder import Embedder, configure_threads, default_model_path

    configure_threads(2)
    model = Embedder(default_model_path(), batch_size=32)
    model.warm_up()
    return model


@pytest.fixture(scope="session")
def count_tokens():
    """The model's tokenizer only (tokenizer.json); loads no torch weights."""
    from apps.knowledge.rag.embedder import Embedder, default_model_path

    return Embedder(default_model_path()).count_tokens
