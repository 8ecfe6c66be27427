"""Answer generators: "extractive" (default, no model), "openai" (any OpenAI-compatible server),
"llama_cpp" (a GGUF model in-process, optional extra)."""
from __future__ import annotations

import threading

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from .base import Generation, Generator, LLMUnavailable, Source, TokenCallback

__all__ = ["Generation", "Generator", "LLMUnavailable", "Source", "TokenCallback", "GENERATORS", "get_generator",
           "generators_reset"]

GENERATORS = ("extractive", "openai", "llama_cpp")
_instances: dict[tuple, Generator] = {}
_lock = threading.Lock()


def _config_key(name: str) -> tuple:
    if name == "openai":
        return (name, settings.LLM_BASE_URL, settings.LLM_API_KEY, settings.LLM_MODEL, settings.LLM_TIMEOUT_SECONDS)
    if name == "llama_cpp":
        return (name, settings.LLAMA_CPP_MODEL_PATH, settings.LLM_TIMEOUT_SECONDS)
    return (name,)


def get_generator(name: str | None = None) -> Generator:
    """The shared generator instance for `name` (default: settings.GENERATOR), built on first use."""
    name = name or settings.GENERATOR
    if name not in GENERATORS:
        raise ImproperlyConfigured(f"Unknown generator {name!r}; choose one of {', '.join(GENERATORS)}.")
    key = _config_key(name)
    with _lock:
        instance = _instances.get(key)
        if instance is None:
            if name == "extractive":
                from .extractive import ExtractiveGenerator

                instance = ExtractiveGenerator()
            elif name == "openai":
                from .openai import OpenAIGenerator

                instance = OpenAIGenerator.from_settings()
            else:
                from .llama_cpp import LlamaCppGenerator

                instance = LlamaCppGenerator.from_settings()
            _instances[key] = instance
    return instance


def generators_reset() -> None:
    with _lock:
        _instances.clear()
