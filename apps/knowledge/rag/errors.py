"""Error types raised by the RAG package.

Ingestion failures carry a stable machine-readable ``code`` so the Django layer can map them to
document states and API errors without parsing messages.
"""
from __future__ import annotations

from typing import Any

UNSUPPORTED_TYPE = "unsupported_type"
CORRUPT_FILE = "corrupt_file"
ENCRYPTED_FILE = "encrypted_file"
EMPTY_DOCUMENT = "empty_document"
TOO_LARGE = "too_large"
DECOMPRESSION_BOMB = "decompression_bomb"

INGEST_ERROR_CODES = frozenset(
    {UNSUPPORTED_TYPE, CORRUPT_FILE, ENCRYPTED_FILE, EMPTY_DOCUMENT, TOO_LARGE, DECOMPRESSION_BOMB}
)


class IngestError(Exception):
    """A document could not be turned into text; ``code`` is one of ``INGEST_ERROR_CODES``."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        if code not in INGEST_ERROR_CODES:
            raise ValueError(f"unknown ingest error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def __repr__(self) -> str:
        return f"IngestError(code={self.code!r}, message={self.message!r}, details={self.details!r})"


class IndexLoadError(Exception):
    """An index version directory is missing, incomplete or inconsistent."""


class RerankerUnavailable(FileNotFoundError):
    """A reranker was configured but its local model files are not there (nothing is downloaded)."""


class QueryModelMismatch(Exception):
    """Query vectors of one embedding model were about to search an index built with another."""
