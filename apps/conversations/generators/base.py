"""What every generator receives and returns. Generators are pure of Django models: they get
numbered sources and return text with [n] markers; the chat service maps the markers to citations."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

from apps.core.errors import ApplicationError

TokenCallback = Callable[[str], None]


@dataclass
class Source:
    """One numbered source of a turn: a knowledge chunk or a successful plugin result."""

    n: int
    type: str  # "chunk" | "plugin"
    title: str
    text: str
    heading: str = ""
    page: int | None = None
    url: str | None = None
    score: float | None = None
    document_id: int | None = None
    chunk_id: int | None = None
    plugin: str | None = None

    def label(self) -> str:
        parts = [self.title or "(untitled)"]
        if self.heading:
            parts.append(self.heading)
        if self.page:
            parts.append(f"page {self.page}")
        return " — ".join(parts)


@dataclass
class Generation:
    text: str
    generator: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # Extractive answers know exactly which sentence they took from each source.
    snippets: dict[int, str] = field(default_factory=dict)
    model: str = ""


class LLMUnavailable(ApplicationError):
    """The generator timed out or failed. The turn is still recorded and its sources returned."""

    status_code = 503

    def __init__(self, message: str, *, reason: str = "error", details: dict[str, Any] | None = None):
        super().__init__("llm_unavailable", message, details=details)
        self.reason = reason  # "timeout" | "error" (metrics label)


class Generator(ABC):
    name: str = "base"

    @abstractmethod
    def generate(self, *, question: str, query: str, history: list[dict], sources: list[Source],
                 on_token: TokenCallback | None = None) -> Generation:
        """Answer `question` from `sources` (numbered from 1), calling on_token as text is produced."""
