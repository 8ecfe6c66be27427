"""The plugin contract: what a plugin author writes against.

This module must stay free of Django imports: plugins are imported and run only inside sandbox
worker processes (apps/plugins/worker.py), which never load Django settings. Everything a hook
can see arrives in a HookContext built from a JSON message sent by the web process.

Lifecycle (per worker process): the class is discovered -> instantiated -> setup(config, storage)
-> hooks are called any number of times -> teardown() when the plugin is disabled, reconfigured,
reloaded or the worker shuts down.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

STAGES = ("before_retrieval", "after_retrieval", "after_answer")
INTENT_STAGE = "intent"

# Scopes a plugin may declare. Enabling a plugin in the admin grants the scopes it declares, except
# EXPLICIT_SCOPES; a capability used without its scope fails with outcome "denied".
SCOPE_HTTP = "http"                            # outbound HTTP, only to the hosts its config allows
SCOPE_STORAGE = "storage"                      # its own namespaced key-value store
SCOPE_CONVERSATION = "conversation:read"       # recent turns of the current conversation
SCOPE_TICKETS = "tickets:create"               # open a support ticket for the current user
SCOPE_KNOWLEDGE = "knowledge:read"             # chunk text of the retrieved sources (explicit grant only)
SCOPES = (SCOPE_HTTP, SCOPE_STORAGE, SCOPE_CONVERSATION, SCOPE_TICKETS, SCOPE_KNOWLEDGE)
# Scopes that enabling does not grant: an administrator grants them one by one (PluginConfig.granted_scopes).
EXPLICIT_SCOPES = (SCOPE_KNOWLEDGE,)

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{1,63}$")
INTENT_RE = re.compile(r"^[a-z][a-z0-9_]{1,63}$")

_HOOK_ATTR = "__kotaemon_hook__"


class PluginError(Exception):
    """Raise from a hook to fail the invocation with a stable code (outcome "error").

    The message is recorded for operators; users are never shown it.
    """

    outcome = "error"

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(message or code)
        self.code = code
        self.message = message or code


class PluginDenied(PluginError):
    """The plugin tried something it is not allowed to do (outcome "denied")."""

    outcome = "denied"


@dataclass
class Result:
    """What an intent hook returns. `content` is what the answer cites; keep it short and factual."""

    title: str
    content: str
    data: dict[str, Any] = field(default_factory=dict)
    url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"title": str(self.title), "content": str(self.content), "data": dict(self.data or {}),
                "url": self.url}


@dataclass(frozen=True)
class HookSpec:
    stage: str                      # "intent" or one of STAGES
    method: str                     # attribute name on the plugin class
    priority: int = 0
    intent: str | None = None
    examples: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()  # regular expressions; named groups become slots
    configurable: bool = False      # intent, examples, keywords, priority read from the plugin's config

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "method": self.method, "priority": self.priority, "intent": self.intent,
                "examples": list(self.examples), "keywords": list(self.keywords),
                "configurable": self.configurable}


def intent_hook(*, intent: str | None = None, priority: int = 0, examples: Iterable[str] = (),
                keywords: Iterable[str] = (), configurable: bool = False) -> Callable:
    """Mark a method as the handler of an intent.

    The router compares the user's message with `examples` (use 8+ varied phrasings, including
    colloquial ones) and matches `keywords` (regexes, case-insensitive). With configurable=True
    the intent name, examples, keywords and priority come from the plugin's config keys
    "intent", "examples", "keywords", "priority" (for plugins set up entirely in the admin).
    The method receives a HookContext and returns a Result, a string, or None (nothing to say).
    """
    if not configurable:
        if not intent or not INTENT_RE.match(intent):
            raise ValueError(f"intent must match {INTENT_RE.pattern}, got {intent!r}")
        if not examples and not keywords:
            raise ValueError(f"intent {intent!r} needs examples or keywords to be recognised")
    for pattern in keywords:
        re.compile(pattern)

    def decorate(func: Callable) -> Callable:
        setattr(func, _HOOK_ATTR, HookSpec(stage=INTENT_STAGE, method=func.__name__, priority=int(priority),
                                           intent=intent, examples=tuple(examples), keywords=tuple(keywords),
                                           configurable=configurable))
        return func

    return decorate


def hook(stage: str, *, priority: int = 0) -> Callable:
    """Mark a method as a generic hook for one stage of every chat turn.

    before_retrieval: may set ctx.query, ctx.skip_retrieval, or return a Result to cite.
    after_retrieval: may reorder or drop ctx.sources (it can never add knowledge chunks).
    after_answer: sees ctx.answer; observation only (the answer is already on its way).
    Higher priority runs first.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")

    def decorate(func: Callable) -> Callable:
        setattr(func, _HOOK_ATTR, HookSpec(stage=stage, method=func.__name__, priority=int(priority)))
        return func

    return decorate


class BasePlugin:
    """Subclass this. Class attributes describe the plugin; the admin shows them.

    config_schema is a JSON Schema object (type "object"). Each property may carry "default",
    "secret": true (stored write-only, never shown back) and "x-allow-host": true (a URL whose host
    the plugin's HTTP client may call).
    """

    name: str = ""
    description: str = ""
    version: str = "0.1.0"
    config_schema: dict[str, Any] = {"type": "object", "properties": {}}
    scopes: tuple[str, ...] = ()

    config: dict[str, Any]
    storage: Any

    def setup(self, config: dict[str, Any], storage: Any) -> None:
        """Called once per worker process before the first hook, and again after a reconfiguration."""
        self.config = config
        self.storage = storage

    def teardown(self) -> None:
        """Release what setup acquired. Called before a reconfigured or disabled instance is dropped."""

    @classmethod
    def hook_specs(cls) -> list[HookSpec]:
        specs = []
        for attr in dir(cls):
            spec = getattr(getattr(cls, attr, None), _HOOK_ATTR, None)
            if isinstance(spec, HookSpec):
                specs.append(spec)
        return sorted(specs, key=lambda s: (-s.priority, s.method))

    @classmethod
    def validate_class(cls) -> None:
        """Raise ValueError when the class does not honour the contract (reported as a load error)."""
        if not isinstance(cls.name, str) or not NAME_RE.match(cls.name):
            raise ValueError(f"{cls.__qualname__}.name must match {NAME_RE.pattern}, got {cls.name!r}")
        schema = cls.config_schema
        if not isinstance(schema, dict) or schema.get("type", "object") != "object":
            raise ValueError(f"{cls.name}: config_schema must be a JSON Schema of type 'object'")
        unknown = [s for s in cls.scopes if s not in SCOPES]
        if unknown:
            raise ValueError(f"{cls.name}: unknown scopes {unknown}; known: {list(SCOPES)}")
        if not cls.hook_specs():
            raise ValueError(f"{cls.name}: declares no hooks (use @intent_hook or @hook)")

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {"name": cls.name, "description": str(cls.description or (cls.__doc__ or "")).strip(),
                "version": str(cls.version), "config_schema": cls.config_schema, "scopes": list(cls.scopes),
                "hooks": [s.to_dict() for s in cls.hook_specs()], "class": f"{cls.__module__}.{cls.__qualname__}"}


@dataclass
class Identity:
    """The current user's verified identity, as authenticated by the platform."""

    id: int
    username: str
    email: str = ""
    groups: tuple[str, ...] = ()


class HookContext:
    """What a hook sees. Built in the worker from the invocation message; a hook mutates only the
    fields its stage allows (query, skip_retrieval, sources) and the platform applies those."""

    def __init__(self, *, stage: str, message: str, query: str, intent: str | None, confidence: float | None,
                 slots: dict[str, str], user: Identity, config: dict[str, Any], history: list[dict],
                 sources: list[dict], plugin_results: list[dict], answer: str | None, storage: Any,
                 user_storage: Any, http: Any, tickets: Any, conversation_id: int | None) -> None:
        self.stage = stage
        self.message = message
        self.query = query
        self.intent = intent
        self.confidence = confidence
        self.slots = slots
        self.user = user
        self.config = config
        self.history = history
        self.sources = sources
        self.plugin_results = plugin_results
        self.answer = answer
        self.skip_retrieval = False
        self.storage = storage
        self.user_storage = user_storage
        self.http = http
        self.tickets = tickets
        self.conversation_id = conversation_id
