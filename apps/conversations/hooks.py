"""Chat turn hook points for plugins.

chat_turn calls run_turn_hooks at three stages:

- "before_retrieval": may rewrite ctx.query, set ctx.skip_retrieval, append PluginResults;
- "after_retrieval": may reorder or filter ctx.sources, append PluginResults;
- "after_answer": sees ctx.answer (observation, auditing).

Successful plugin results (ok=True) become numbered sources in the prompt and citations of type
"plugin" beside the knowledge chunks. A hook that raises is logged and skipped: the turn always
answers. Hooks run in the thread of the turn, so they must be thread-safe; the plugin runner
applies its own sandboxing and time limits.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from django.contrib.auth.models import AbstractBaseUser as User

    from apps.knowledge.selectors import RetrievedChunk

logger = logging.getLogger(__name__)

STAGES = ("before_retrieval", "after_retrieval", "after_answer")


@dataclass
class PluginResult:
    plugin: str
    intent: str | None
    ok: bool
    title: str
    content: str  # what the answer cites
    data: dict = field(default_factory=dict)
    error_code: str | None = None
    url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"plugin": self.plugin, "intent": self.intent, "ok": self.ok, "title": self.title,
                "content": self.content, "data": self.data, "error_code": self.error_code, "url": self.url}


@dataclass
class TurnContext:
    user: "User"
    session_id: str
    conversation_id: int
    message: str  # the user's raw message
    query: str  # the retrieval query; a before_retrieval hook may rewrite it
    knowledge_bases: list | None
    history: list[dict]  # recent turns [{"role", "content"}]
    sources: list["RetrievedChunk"] = field(default_factory=list)
    plugin_results: list[PluginResult] = field(default_factory=list)
    skip_retrieval: bool = False
    answer: str | None = None


TurnHook = Callable[[str, TurnContext], None]

_hooks: list[TurnHook] = []
_lock = threading.Lock()


def register_turn_hook(hook: TurnHook) -> None:
    """Idempotent: registering the same callable twice (e.g. ready() run twice) keeps one."""
    with _lock:
        if hook not in _hooks:
            _hooks.append(hook)


def unregister_turn_hook(hook: TurnHook) -> None:
    with _lock:
        if hook in _hooks:
            _hooks.remove(hook)


def registered_turn_hooks() -> list[TurnHook]:
    with _lock:
        return list(_hooks)


def run_turn_hooks(stage: str, ctx: TurnContext) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown hook stage {stage!r}")
    for hook in registered_turn_hooks():
        try:
            hook(stage, ctx)
        except Exception:
            # Never let a plugin break a turn; the message text is not logged (it may hold personal data).
            logger.exception("chat turn hook failed", extra={"stage": stage, "hook": getattr(hook, "__qualname__", repr(hook))})
