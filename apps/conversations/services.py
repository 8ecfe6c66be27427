"""Writes for conversations and the chat turn used by REST, the websocket and the web page alike."""
from __future__ import annotations

import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.translation import gettext

from apps.core.errors import ApplicationError, NotFound
from apps.core.logging import session_id_var

from . import metrics
from .generators import Generation, LLMUnavailable, Source, TokenCallback, get_generator
from .generators.extractive import terms
from .hooks import PluginResult, TurnContext, run_turn_hooks
from .models import Conversation, Feedback, Message
from .prompt import cited_numbers
from .selectors import (STATE_TURN_CHARS, STATE_TURNS, conversation_find, conversation_get, message_get_for_feedback,
                        session_id_validate, session_state_get, session_state_matches)
from .session_store import get_session_store

logger = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 8000
MAX_KNOWLEDGE_BASES = 20
SNIPPET_CHARS = 320
TITLE_CHARS = 80


def new_session_id() -> str:
    return secrets.token_urlsafe(16)


# --- conversations ------------------------------------------------------------------------

def conversation_update(*, user: AbstractBaseUser, session_id: str, title: str | None = None,
                        archived: bool | None = None) -> Conversation:
    """Rename and/or archive (or unarchive) one of the user's conversations."""
    conversation = conversation_get(user=user, session_id=session_id)
    fields = []
    if title is not None:
        title = " ".join(title.split())
        if not title:
            raise ApplicationError("invalid_title", gettext("A title cannot be empty."))
        if len(title) > 200:
            raise ApplicationError("invalid_title", gettext("A title is at most 200 characters."))
        conversation.title = title
        fields.append("title")
    if archived is not None:
        conversation.archived = archived
        fields.append("archived")
    if fields:
        conversation.save(update_fields=fields + ["updated_at"])
    return conversation


def conversation_delete(*, user: AbstractBaseUser, session_id: str) -> None:
    conversation = conversation_get(user=user, session_id=session_id)
    with transaction.atomic():
        conversation.delete()
    # After the delete, so a concurrent turn cannot rebuild the state from rows that are gone.
    get_session_store().delete(session_id)


def feedback_submit(*, user: AbstractBaseUser, message_id: int, rating: str, comment: str = "") -> Feedback:
    """One rating per user and answer; submitting again replaces it (idempotent)."""
    if rating not in Feedback.Rating.values:
        raise ApplicationError("invalid_rating", gettext("rating must be 'up' or 'down'."), details={"rating": rating})
    if len(comment) > 4000:
        raise ApplicationError("comment_too_long", gettext("A comment is at most 4000 characters."))
    message = message_get_for_feedback(user=user, message_id=message_id)
    feedback, _ = Feedback.objects.update_or_create(message=message, user=user,
                                                    defaults={"rating": rating, "comment": comment.strip()})
    return feedback


# --- the chat turn ------------------------------------------------------------------------

@dataclass
class ChatTurnResult:
    session_id: str
    message_id: int
    user_message_id: int
    answer: str
    citations: list[dict[str, Any]]
    plugin_results: list[dict[str, Any]]
    usage: dict[str, Any]
    query: str = ""
    sources: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "message_id": self.message_id, "answer": self.answer,
                "citations": self.citations, "plugin_results": self.plugin_results, "usage": self.usage}


_FOLLOW_UP_START = re.compile(r"^\s*(and|but|also|so|then|or|what about|how about|and what|same for|why)\b", re.I)
_ANAPHORA = frozenset("it its it's that this those these they them their there he she him her his hers one ones "
                      "same such former latter".split())


def contextualise(message: str, state: dict[str, Any]) -> str:
    """The retrieval query for `message`: a follow-up ("and how long does that take?") is joined
    to the question it follows, so that it retrieves as well as the full question would."""
    previous = state.get("last_query") or next(
        (t.get("content", "") for t in reversed(state.get("turns") or []) if t.get("role") == "user"), "")
    if not previous:
        return message
    words = re.findall(r"[a-z']+", message.lower())
    follow_up = (bool(_FOLLOW_UP_START.match(message)) or any(w in _ANAPHORA for w in words)
                 or len(terms(message)) <= 1)
    if not follow_up:
        return message
    # Keep the end of a long chain of follow-ups: the most recent topic matters most.
    return f"{previous[-400:]} {message}".strip()


def _validate_message(message: Any) -> str:
    if not isinstance(message, str) or not message.strip():
        raise ApplicationError("message_required", gettext("Send a non-empty message."))
    message = message.strip()
    if len(message) > MAX_MESSAGE_CHARS:
        raise ApplicationError("message_too_long", gettext("A message is at most %(max)s characters.")
                                                   % {"max": MAX_MESSAGE_CHARS},
                               details={"max_chars": MAX_MESSAGE_CHARS, "chars": len(message)})
    return message


def _validate_knowledge_bases(*, user: AbstractBaseUser, knowledge_bases: Any) -> list | None:
    """The requested knowledge bases, checked against what the user may read (same 404 as a
    nonexistent one). None means every readable knowledge base."""
    if knowledge_bases is None:
        return None
    if (not isinstance(knowledge_bases, list) or len(knowledge_bases) > MAX_KNOWLEDGE_BASES
            or not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in knowledge_bases)):
        raise ApplicationError("invalid_knowledge_bases",
                               gettext("knowledge_bases is a list of up to %(max)s slugs or ids.")
                               % {"max": MAX_KNOWLEDGE_BASES})
    if not knowledge_bases:
        return None
    from apps.knowledge.selectors import knowledge_bases_visible

    visible = list(knowledge_bases_visible(user=user))
    by_key: dict[str, Any] = {}
    for kb in visible:
        by_key[str(kb.pk)] = kb
        by_key[kb.slug] = kb
    resolved = []
    for key in knowledge_bases:
        kb = by_key.get(str(key))
        if kb is None:
            raise NotFound(gettext("No such knowledge base."), code="knowledge_base_not_found", details={"knowledge_base": key})
        if kb not in resolved:
            resolved.append(kb)
    return resolved


def _generator_name(kbs: list | None) -> str:
    """settings.GENERATOR, unless every knowledge base asked for names the same other generator
    (a `generator` field on the knowledge base, or GENERATOR_BY_KNOWLEDGE_BASE in settings)."""
    if kbs:
        mapping = getattr(settings, "GENERATOR_BY_KNOWLEDGE_BASE", {}) or {}
        names = {getattr(kb, "generator", "") or mapping.get(kb.slug, "") for kb in kbs}
        if len(names) == 1 and (name := names.pop()):
            return name
    return settings.GENERATOR


def _sources(ctx: TurnContext) -> list[Source]:
    sources: list[Source] = []
    for result in ctx.plugin_results:
        if result.ok and result.content:
            sources.append(Source(n=len(sources) + 1, type="plugin", title=result.title or result.plugin,
                                  text=result.content, url=result.url, plugin=result.plugin))
    for chunk in ctx.sources:
        sources.append(Source(
            n=len(sources) + 1, type="chunk", title=chunk.document_title, text=chunk.text,
            heading=" › ".join(chunk.heading_path or []), page=chunk.page, url=chunk.url, score=chunk.score,
            document_id=chunk.document_id, chunk_id=chunk.chunk_id,
        ))
    return sources


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS].rsplit(" ", 1)[0] + "…"


def citation_for(source: Source, snippet: str | None = None) -> dict[str, Any]:
    snippet = _snippet(snippet or source.text)
    if source.type == "plugin":
        return {"n": source.n, "type": "plugin", "plugin": source.plugin, "title": source.title, "snippet": snippet,
                "url": source.url}
    return {"n": source.n, "type": "chunk", "document_id": source.document_id, "document_title": source.title,
            "chunk_id": source.chunk_id, "page": source.page, "heading": source.heading, "snippet": snippet,
            "score": round(float(source.score), 6) if source.score is not None else None, "url": source.url}


def _conversation_for_turn(*, user: AbstractBaseUser, session_id: str | None) -> tuple[Conversation, bool]:
    if session_id is None:
        session_id = new_session_id()
    conversation = conversation_find(user=user, session_id=session_id_validate(session_id))
    if conversation is not None:
        if conversation.archived:
            raise ApplicationError("conversation_archived",
                                   gettext("This conversation is archived; unarchive it to continue."),
                                   details={"session_id": session_id}, status=409)
        return conversation, False
    try:
        with transaction.atomic():
            return Conversation.objects.create(session_id=session_id, owner=user), True
    except IntegrityError:
        # Two first messages raced for a new id: the loser joins the winner's conversation, if it is ours.
        return conversation_get(user=user, session_id=session_id), False


def _append_turns(conversation: Conversation, new_turns: list[dict[str, str]], query: str):
    def append(current: dict | None) -> dict:
        from .selectors import session_state_from_database

        if not session_state_matches(current, conversation):
            # The messages were committed before this update, so the rebuild already holds them.
            return session_state_from_database(conversation=conversation)
        turns = (current.get("turns") or []) + [
            {"role": t["role"], "content": t["content"][:STATE_TURN_CHARS]} for t in new_turns]
        current["turns"] = turns[-STATE_TURNS:]
        current["last_query"] = query
        return current

    return get_session_store().update(conversation.session_id, append)


def chat_turn(*, user: AbstractBaseUser, session_id: str | None, message: Any, knowledge_bases: Any = None,
              on_token: TokenCallback | None = None, channel: str = "rest") -> ChatTurnResult:
    """Answer one user message in a conversation, with citations, and record the turn.

    session_id None starts a new conversation; an unknown (well-formed) id starts one with that id;
    another user's id is "conversation_not_found". Raises LLMUnavailable (code llm_unavailable)
    when the generator fails: the user's message is saved and the sources are in its details.
    """
    started = time.monotonic()
    message = _validate_message(message)
    kbs = _validate_knowledge_bases(user=user, knowledge_bases=knowledge_bases)
    conversation, created = _conversation_for_turn(user=user, session_id=session_id)
    token = session_id_var.set(conversation.session_id)
    outcome = "error"
    try:
        state = session_state_get(conversation=conversation).data
        history = [{"role": t.get("role"), "content": t.get("content")} for t in state.get("turns") or []]
        ctx = TurnContext(user=user, session_id=conversation.session_id, conversation_id=conversation.pk,
                          message=message, query=contextualise(message, state),
                          knowledge_bases=[kb.slug for kb in kbs] if kbs else None, history=history)

        run_turn_hooks("before_retrieval", ctx)
        if not ctx.skip_retrieval:
            from apps.knowledge.selectors import chunks_retrieve

            ctx.sources = list(chunks_retrieve(user=user, query=ctx.query, knowledge_bases=[kb.pk for kb in kbs]
                                               if kbs else None, top_k=getattr(settings, "CHAT_TOP_K", 6)))
        run_turn_hooks("after_retrieval", ctx)
        sources = _sources(ctx)

        generator_name = _generator_name(kbs)
        generation: Generation | None = None
        error: LLMUnavailable | None = None
        gen_started = time.monotonic()
        try:
            generation = get_generator(generator_name).generate(
                question=message, query=ctx.query, history=history, sources=sources, on_token=on_token)
        except LLMUnavailable as exc:
            error = exc
        gen_seconds = time.monotonic() - gen_started
        metrics.llm_calls_total.labels(generator_name, "ok" if error is None else error.reason).inc()
        metrics.llm_latency_seconds.labels(generator_name).observe(gen_seconds)
        plugin_results = [r.to_dict() for r in ctx.plugin_results]

        if error is not None:
            with transaction.atomic():
                user_msg = Message.objects.create(conversation=conversation, role=Message.Role.USER, content=message,
                                                  query=ctx.query, generator=generator_name,
                                                  error_code=error.code)
                _touch(conversation, message)
            _append_turns(conversation, [{"role": "user", "content": message}], ctx.query)
            error.details = {**error.details, "session_id": conversation.session_id, "user_message_id": user_msg.pk,
                             "sources": [citation_for(s) for s in sources], "plugin_results": plugin_results}
            outcome = "llm_unavailable"
            logger.warning("generator unavailable", extra={"generator": generator_name, "reason": error.reason})
            raise error

        ctx.answer = generation.text
        run_turn_hooks("after_answer", ctx)
        answer, cited = cited_numbers(ctx.answer or "", {s.n for s in sources})
        by_n = {s.n: s for s in sources}
        citations = [citation_for(by_n[n], generation.snippets.get(n)) for n in cited]
        latency_ms = round((time.monotonic() - started) * 1000, 1)
        usage = {"generator": generation.generator, "model": generation.model,
                 "prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
                 "total_tokens": (generation.prompt_tokens or 0) + (generation.completion_tokens or 0),
                 "latency_ms": latency_ms}
        for kind in ("prompt", "completion"):
            if usage[f"{kind}_tokens"]:
                metrics.llm_tokens_total.labels(generator_name, kind).inc(usage[f"{kind}_tokens"])

        with transaction.atomic():
            user_msg = Message.objects.create(conversation=conversation, role=Message.Role.USER, content=message,
                                              query=ctx.query)
            reply = Message.objects.create(
                conversation=conversation, role=Message.Role.ASSISTANT, content=answer, citations=citations,
                plugin_results=plugin_results, generator=generation.generator,
                prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens,
                latency_ms=latency_ms)
            _touch(conversation, message)
        _append_turns(conversation, [{"role": "user", "content": message}, {"role": "assistant", "content": answer}],
                      ctx.query)
        outcome = "ok"
        metrics.chat_turn_duration_seconds.labels(generation.generator).observe(time.monotonic() - started)
        return ChatTurnResult(session_id=conversation.session_id, message_id=reply.pk, user_message_id=user_msg.pk,
                              answer=answer, citations=citations, plugin_results=plugin_results, usage=usage,
                              query=ctx.query, sources=[citation_for(s) for s in sources])
    except Exception:
        if created and not Message.objects.filter(conversation=conversation).exists():
            # Nothing was recorded: don't leave an empty conversation behind.
            Conversation.objects.filter(pk=conversation.pk).delete()
        raise
    finally:
        metrics.chat_turns_total.labels(channel, outcome).inc()
        session_id_var.reset(token)


def _touch(conversation: Conversation, first_message: str) -> None:
    fields = {"updated_at": timezone.now()}
    if not conversation.title:
        title = " ".join(first_message.split())
        fields["title"] = title if len(title) <= TITLE_CHARS else title[:TITLE_CHARS].rsplit(" ", 1)[0] + "…"
        conversation.title = fields["title"]
    Conversation.objects.filter(pk=conversation.pk).update(**fields)


__all__ = ["ChatTurnResult", "chat_turn", "contextualise", "conversation_delete", "conversation_update",
           "feedback_submit", "new_session_id", "citation_for", "PluginResult"]
