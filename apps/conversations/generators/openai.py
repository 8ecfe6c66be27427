"""Any OpenAI-compatible chat completions server (OpenAI, vLLM, llama.cpp's server, Ollama, ...).

Streams with server-sent events and records token usage: from the server's usage report when it
sends one (stream_options.include_usage), otherwise counted from the streamed chunks.
"""
from __future__ import annotations

import json
import time

import httpx
from django.conf import settings
from django.utils.translation import gettext

from ..prompt import build_messages
from .base import Generation, Generator, LLMUnavailable, Source, TokenCallback


class OpenAIGenerator(Generator):
    name = "openai"

    def __init__(self, *, base_url: str, api_key: str, model: str, timeout: float, max_tokens: int = 512,
                 temperature: float = 0.2):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.timeout = timeout
        self.max_tokens = max_tokens
        self.temperature = temperature
        # One client per process: keeps connections to the LLM server alive between turns.
        self._client = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    @classmethod
    def from_settings(cls) -> "OpenAIGenerator":
        return cls(base_url=settings.LLM_BASE_URL, api_key=settings.LLM_API_KEY, model=settings.LLM_MODEL,
                   timeout=settings.LLM_TIMEOUT_SECONDS,
                   max_tokens=getattr(settings, "LLM_MAX_TOKENS", 512))

    def generate(self, *, question: str, query: str, history: list[dict], sources: list[Source],
                 on_token: TokenCallback | None = None) -> Generation:
        if not self.base_url:
            raise LLMUnavailable(gettext("The language model is not configured (LLM_BASE_URL is empty)."), reason="error")
        body = {
            "model": self.model or "default",
            "messages": build_messages(question=question, history=history, sources=sources),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        deadline = time.monotonic() + self.timeout
        pieces: list[str] = []
        usage: dict = {}
        chunks = 0
        try:
            with self._client.stream("POST", f"{self.base_url}/chat/completions", json=body, headers=headers) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise LLMUnavailable(gettext("The language model server answered HTTP %(status)s.")
                                         % {"status": resp.status_code},
                                         reason="error", details={"status": resp.status_code})
                for line in resp.iter_lines():
                    if time.monotonic() > deadline:
                        raise LLMUnavailable(gettext("The language model did not finish in time."), reason="timeout")
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        event = json.loads(data)
                    except ValueError:
                        continue
                    if event.get("usage"):
                        usage = event["usage"]
                    for choice in event.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") or ""
                        if text:
                            chunks += 1
                            pieces.append(text)
                            if on_token is not None:
                                on_token(text)
        except httpx.TimeoutException as exc:
            raise LLMUnavailable(gettext("The language model did not answer in time."), reason="timeout") from exc
        except httpx.HTTPError as exc:
            raise LLMUnavailable(gettext("The language model server could not be reached."), reason="error",
                                 details={"error": type(exc).__name__}) from exc
        return Generation(
            text="".join(pieces).strip(), generator=self.name, model=self.model,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens", chunks if not usage else None),
        )
