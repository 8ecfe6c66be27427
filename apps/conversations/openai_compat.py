"""The OpenAI wire format for the chat service: /v1/models and /v1/chat/completions.

Translation only: requests become the arguments of the one chat service (chat_turn / turn_start),
its results and turn events become OpenAI objects and chunks. Nothing here decides who may read
what, rate limits or answers: that is the chat service, as for REST and the websocket.
"""
from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.utils.translation import gettext as _

from apps.core.errors import ApplicationError, NotFound

from .streaming import follow, sse

OWNED_BY = "kotaemon-site"
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def all_model_id() -> str:
    return getattr(settings, "OPENAI_ALL_MODEL", "kotaemon-all")


def approx_tokens(text: str) -> int:
    """Word pieces: the usage reported when the generator counts no tokens (the extractive answerer)."""
    return len(_TOKEN_RE.findall(text or ""))


def _model(model_id: str, created: float) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(created), "owned_by": OWNED_BY}


def models_list(*, user) -> dict[str, Any]:
    """One model per knowledge base the user may read (id = its slug), then one searching them all."""
    from apps.knowledge.selectors import knowledge_bases_visible

    kbs = list(knowledge_bases_visible(user=user).order_by("slug"))
    first = min((kb.created_at.timestamp() for kb in kbs), default=time.time())
    data = [_model(kb.slug, kb.created_at.timestamp()) for kb in kbs if kb.slug != all_model_id()]
    data.append(_model(all_model_id(), first))
    return {"object": "list", "data": data}


def model_get(*, user, model_id: str) -> dict[str, Any]:
    for model in models_list(user=user)["data"]:
        if model["id"] == model_id:
            return model
    raise NotFound(_("The model '%(model)s' does not exist or you do not have access to it.") % {"model": model_id},
                   code="model_not_found", details={"param": "model"})


def model_knowledge_bases(*, user, model_id: Any) -> list[str] | None:
    """The knowledge bases a model id stands for: None (every readable one) for the all-model."""
    if not isinstance(model_id, str) or not model_id:
        raise ApplicationError("invalid_request", _("model is required."), details={"param": "model"})
    if model_id == all_model_id():
        return None
    model_get(user=user, model_id=model_id)
    return [model_id]


@dataclass
class CompletionRequest:
    model: str
    message: str
    history: list[dict[str, str]]
    session_id: str | None
    knowledge_bases: list[str] | None
    stream: bool
    include_usage: bool


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def completion_request_parse(*, user, body: Any, session_header: str | None) -> CompletionRequest:
    """The session: the X-Session-ID header, else metadata.session_id, else the conversation whose last
    answer is the last assistant message the client sent back (what chat UIs do), else a new one."""
    from .selectors import conversation_find_by_answer

    if not isinstance(body, dict):
        raise ApplicationError("invalid_request", _("The body is a JSON object."))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApplicationError("invalid_request", _("messages is a non-empty list of messages."),
                               details={"param": "messages"})
    last = messages[-1]
    if last.get("role") != "user":
        raise ApplicationError("invalid_request", _("The last message must have the role 'user'."),
                               details={"param": "messages"})
    history = [{"role": m.get("role"), "content": _text(m.get("content"))} for m in messages[:-1]
               if m.get("role") in ("user", "assistant")]
    knowledge_bases = model_knowledge_bases(user=user, model_id=body.get("model"))
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    session_id = session_header or metadata.get("session_id") or None
    if session_id is None:
        previous = next((h["content"] for h in reversed(history) if h["role"] == "assistant" and h["content"]), None)
        if previous:
            session_id = conversation_find_by_answer(user=user, answer=previous)
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    return CompletionRequest(model=body["model"], message=_text(last.get("content")), history=history,
                             session_id=session_id, knowledge_bases=knowledge_bases, stream=body.get("stream") is True,
                             include_usage=options.get("include_usage") is True)


def _usage(usage: dict[str, Any], request: CompletionRequest, answer: str) -> dict[str, int]:
    prompt = usage.get("prompt_tokens") or approx_tokens(
        " ".join([request.message] + [h["content"] for h in request.history]))
    completion = usage.get("completion_tokens") or approx_tokens(answer)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _extension(payload: dict[str, Any]) -> dict[str, Any]:
    """Citations and the conversation: an extension field beside OpenAI's own."""
    return {"session_id": payload["session_id"], "message_id": payload["message_id"],
            "citations": payload["citations"], "plugin_results": payload["plugin_results"]}


def completion_body(payload: dict[str, Any], *, request: CompletionRequest, completion_id: str,
                    created: int) -> dict[str, Any]:
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": request.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": payload["answer"]},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": _usage(payload.get("usage") or {}, request, payload["answer"]),
        "kotaemon": _extension(payload),
    }


def _chunk(completion_id: str, created: int, model: str, delta: dict | None, finish: str | None = None,
           **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, **extra}


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error"}


def error_body(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenAI's error shape; our stable code in `code`, the offending field (if known) in `param`."""
    details = details or {}
    param = details.get("param")
    if param is None and isinstance(details.get("fields"), dict) and details["fields"]:
        param = next(iter(details["fields"]))
    if param is None and code.startswith("message"):
        param = "messages"
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


async def completion_chunks(turn_id: str, *, request: CompletionRequest, completion_id: str, created: int,
                            after: int = 0) -> AsyncIterator[bytes]:
    """The turn's events as chat.completion.chunk objects (each with `id: <offset>` for resuming), then
    `data: [DONE]`. A "reset" (a takeover regenerated the answer differently) has no OpenAI equivalent:
    it is a chunk with kotaemon.reset = true, and the final chunk's kotaemon.answer is the whole answer."""
    model = request.model
    async for offset, event in follow(turn_id, after):
        kind = event.get("type")
        if kind == "turn":
            yield sse(_chunk(completion_id, created, model, {"role": "assistant", "content": ""},
                             kotaemon={"session_id": event["session_id"], "message_id": event["message_id"]}),
                      id=offset)
        elif kind == "token":
            yield sse(_chunk(completion_id, created, model, {"content": event.get("text") or ""}), id=offset)
        elif kind == "reset":
            yield sse(_chunk(completion_id, created, model, {"content": ""}, kotaemon={"reset": True}), id=offset)
        elif kind == "answer":
            yield sse(_chunk(completion_id, created, model, {}, "stop",
                             kotaemon={**_extension(event), "answer": event["answer"]}), id=offset)
            if request.include_usage:
                yield sse(_chunk(completion_id, created, model, None,
                                 usage=_usage(event.get("usage") or {}, request, event["answer"])))
        elif kind == "error":
            status = 503 if event.get("code") == "llm_unavailable" else 500 if event.get("code") == "server_error" else 400
            yield sse(error_body(status, event.get("code") or "server_error", event.get("message") or "",
                                 event.get("details")), id=offset)
    yield sse("[DONE]")
