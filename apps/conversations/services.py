"""Writes for conversations and the chat turn used by REST, the websocket and the web page alike."""
from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils import translation
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
# Chinese follow-ups: "那要多久？", "还有呢", "它支持微信支付吗？" (no word boundaries in Chinese).
_ZH_FOLLOW_UP = re.compile(r"^\s*(那|那么|还有|另外|而且|但是|可是|如果是|同样|它|它们|这个|那个|这些|那些|这样)|它")
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
    follow_up = (bool(_FOLLOW_UP_START.match(message) or _ZH_FOLLOW_UP.search(message))
                 or any(w in _ANAPHORA for w in words)
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


# A turn is opened (validated, the user's message and an empty "streaming" answer saved, its event
# stream created with this process holding the lease), then executed: by the caller's thread
# (chat_turn), by a background thread (streaming channels), or by another instance that took over
# an expired lease (turn_takeover). Execution writes every token to the stream and the text so far
# to the answer row; completing the row is a conditional update, so a turn completes exactly once.

@dataclass
class TurnHandle:
    turn_id: str
    session_id: str
    user_message_id: int
    message_id: int
    spec: dict[str, Any]
    writer: Any  # turn_stream.TurnWriter: only the process holding the lease has one


def turn_open(*, user: AbstractBaseUser, session_id: str | None, message: Any, knowledge_bases: Any = None,
              channel: str = "rest") -> TurnHandle:
    """Validate a user message, save it (and an empty answer being generated) and create its event
    stream. Raises ApplicationError for bad input, before anything is saved."""
    from .turn_stream import new_turn_id, turn_create

    message = _validate_message(message)
    kbs = _validate_knowledge_bases(user=user, knowledge_bases=knowledge_bases)
    conversation, _created = _conversation_for_turn(user=user, session_id=session_id)
    turn_id = new_turn_id()
    # Saved first: from here on a crash, a disconnect or a refresh cannot lose the user's message.
    with transaction.atomic():
        user_msg = Message.objects.create(conversation=conversation, role=Message.Role.USER, content=message,
                                          turn_id=turn_id)
        reply = Message.objects.create(conversation=conversation, role=Message.Role.ASSISTANT, content="",
                                       status=Message.Status.STREAMING, turn_id=turn_id)
        _touch(conversation, message)
    spec = {"turn_id": turn_id, "session_id": conversation.session_id, "conversation_id": conversation.pk,
            "user_id": user.pk, "message": message, "knowledge_bases": [kb.slug for kb in kbs] if kbs else None,
            "channel": channel, "user_message_id": user_msg.pk, "message_id": reply.pk, "created": time.time(),
            # The requester's language: a background thread or another instance answers in it too.
            "language": translation.get_language()}
    try:
        writer = turn_create(turn_id, spec=spec, session_id=conversation.session_id)
        writer.emit({"type": "turn", "turn_id": turn_id, "session_id": conversation.session_id,
                     "user_message_id": user_msg.pk, "message_id": reply.pk})
    except Exception:
        # Without a stream nobody can answer: record the message as failed rather than pending forever.
        Message.objects.filter(pk=reply.pk).delete()
        Message.objects.filter(pk=user_msg.pk).update(error_code="service_unavailable")
        raise
    return TurnHandle(turn_id=turn_id, session_id=conversation.session_id, user_message_id=user_msg.pk,
                      message_id=reply.pk, spec=spec, writer=writer)


def chat_turn(*, user: AbstractBaseUser, session_id: str | None, message: Any, knowledge_bases: Any = None,
              on_token: TokenCallback | None = None, channel: str = "rest") -> ChatTurnResult:
    """Answer one user message in a conversation, with citations, and record the turn.

    session_id None starts a new conversation; an unknown (well-formed) id starts one with that id;
    another user's id is "conversation_not_found". Raises LLMUnavailable (code llm_unavailable)
    when the generator fails: the user's message is saved and the sources are in its details.
    The answer is streamed into the turn's event log as it is generated (see turn_open).
    """
    handle = turn_open(user=user, session_id=session_id, message=message, knowledge_bases=knowledge_bases,
                       channel=channel)
    from .turn_stream import LeaseLost

    try:
        return turn_execute(handle.spec, handle.writer, on_token=on_token, user=user)
    except LeaseLost:
        # This process stalled past its lease and another instance took the turn over: its answer is ours.
        return _await_result(handle)
    finally:
        handle.writer.close()


def _await_result(handle: TurnHandle) -> ChatTurnResult:
    from .turn_stream import TERMINAL, get_backend

    backend = get_backend()
    deadline = time.monotonic() + getattr(settings, "LLM_TIMEOUT_SECONDS", 60) + 2 * backend.lease_seconds
    after = 0
    while time.monotonic() < deadline:
        for offset, event in backend.wait(handle.turn_id, after=after, timeout=1.0):
            after = offset
            if event.get("type") in TERMINAL:
                if event["type"] == "error":
                    raise ApplicationError(event.get("code") or "server_error", event.get("message") or "",
                                           details=event.get("details"),
                                           status=503 if event.get("code") == "llm_unavailable" else None)
                reply = Message.objects.select_related("conversation").get(pk=handle.message_id)
                return _stored_result(reply)
        if backend.lease_holder(handle.turn_id) is None:
            turn_takeover(handle.turn_id)
    raise ApplicationError("server_error", gettext("The answer did not complete in time."), status=503)


def turn_start(*, user: AbstractBaseUser, session_id: str | None, message: Any, knowledge_bases: Any = None,
               channel: str = "rest") -> TurnHandle:
    """turn_open, then generate in a background thread; read the answer with turn_stream.turn_follow."""
    handle = turn_open(user=user, session_id=session_id, message=message, knowledge_bases=knowledge_bases,
                       channel=channel)
    _run_in_background(handle.spec, handle.writer)
    return handle


def _run_in_background(spec: dict[str, Any], writer, shown: str | None = None) -> threading.Thread:
    from django.db import connections

    from .turn_stream import LeaseLost

    def run() -> None:
        try:
            turn_execute(spec, writer, shown=shown)
        except LeaseLost:
            logger.warning("turn taken over by another instance", extra={"turn_id": spec["turn_id"]})
        except ApplicationError:
            pass  # already in the stream as an error event
        except Exception:
            logger.exception("background chat turn failed")
        finally:
            writer.close()
            connections.close_all()

    thread = threading.Thread(target=run, name=f"turn-{spec['turn_id'][:8]}", daemon=True)
    thread.start()
    return thread


def shown_text(events: list[tuple[int, dict]]) -> str:
    """The answer text a client following `events` holds: tokens since the last reset."""
    text = ""
    for _offset, event in events:
        if event.get("type") == "reset":
            text = ""
        elif event.get("type") == "token":
            text += event.get("text") or ""
    return text


def turn_takeover(turn_id: str) -> bool:
    """Continue a turn whose generating instance died (its lease expired). True if this process took it."""
    from .turn_stream import get_backend, turn_acquire

    backend = get_backend()
    spec = backend.spec(turn_id)
    if spec is None:
        backend.forget(turn_id)
        return False
    writer = turn_acquire(turn_id)
    if writer is None:
        return False
    metrics.turn_takeovers_total.inc()
    logger.warning("taking over an orphaned chat turn", extra={"turn_id": turn_id})
    _run_in_background(backend.spec(turn_id) or spec, writer, shown=shown_text(backend.read(turn_id)))
    return True


def turns_reconcile() -> None:
    """Cluster reconciler: take over every active turn nobody holds a lease on."""
    from .turn_stream import get_backend, is_local

    backend = get_backend()
    for turn_id in backend.active():
        if not is_local(turn_id) and backend.lease_holder(turn_id) is None:
            turn_takeover(turn_id)


def turn_for_resume(*, user: AbstractBaseUser, turn_id: Any = None, session_id: str | None = None) -> str:
    """The turn a client may resume: its own, by id, or the latest of one of its sessions.
    Another user's turn, an expired one and a nonexistent one are all "turn_not_found"."""
    from .turn_stream import get_backend

    backend = get_backend()
    if turn_id is None and session_id is not None:
        turn_id = backend.session_turn(session_id_validate(session_id))
    if not isinstance(turn_id, str) or not re.fullmatch(r"[0-9a-f]{32}", turn_id):
        raise NotFound(gettext("No such answer in progress (it may have expired)."), code="turn_not_found")
    spec = backend.spec(turn_id)
    if not spec or spec.get("user_id") != user.pk or (session_id is not None and spec.get("session_id") != session_id):
        raise NotFound(gettext("No such answer in progress (it may have expired)."), code="turn_not_found")
    return turn_id


class _AnswerStream:
    """on_token of a generation: every piece goes to the event log and, every TURN_PERSIST_SECONDS,
    the text so far to the answer row. On a takeover, `shown` is what clients already received from
    the previous owner: a regenerated answer that repeats it is not sent twice; one that differs is
    announced with a "reset" event and sent whole."""

    def __init__(self, writer, message_id: int, on_token: TokenCallback | None, shown: str | None):
        self.writer = writer
        self.message_id = message_id
        self.on_token = on_token
        self.shown = shown or None
        self.text = ""
        self.persisted_at = time.monotonic()
        self.every = getattr(settings, "TURN_PERSIST_SECONDS", 0.5)

    def __call__(self, piece: str) -> None:
        self.text += piece
        if self.shown is not None:
            if self.shown.startswith(self.text):
                return  # still repeating what clients have
            if self.text.startswith(self.shown):
                piece = self.text[len(self.shown):]
            else:
                self.writer.emit({"type": "reset"})
                piece = self.text
            self.shown = None
        self.writer.emit({"type": "token", "text": piece})
        if self.on_token is not None:
            self.on_token(piece)
        if time.monotonic() - self.persisted_at >= self.every:
            self.persisted_at = time.monotonic()
            Message.objects.filter(pk=self.message_id, status=Message.Status.STREAMING).update(content=self.text)

    def finish(self) -> None:
        if self.shown is not None and self.shown != self.text:
            self.writer.emit({"type": "reset"})
            if self.text:
                self.writer.emit({"type": "token", "text": self.text})
        self.shown = None


def _stored_result(reply: Message) -> ChatTurnResult:
    user_msg = (Message.objects.filter(conversation_id=reply.conversation_id, turn_id=reply.turn_id,
                                       role=Message.Role.USER).first() if reply.turn_id else None)
    usage = {"generator": reply.generator, "model": "", "prompt_tokens": reply.prompt_tokens,
             "completion_tokens": reply.completion_tokens,
             "total_tokens": (reply.prompt_tokens or 0) + (reply.completion_tokens or 0), "latency_ms": reply.latency_ms}
    return ChatTurnResult(session_id=reply.conversation.session_id, message_id=reply.pk,
                          user_message_id=user_msg.pk if user_msg else 0, answer=reply.content,
                          citations=reply.citations, plugin_results=reply.plugin_results, usage=usage,
                          query=user_msg.query if user_msg else "")


def _emit_error(writer, exc: ApplicationError) -> None:
    from .turn_stream import LeaseLost

    try:
        writer.emit({"type": "error", "code": exc.code, "message": str(exc.message), "details": exc.details})
    except LeaseLost:
        pass


def turn_execute(spec: dict[str, Any], writer, *, on_token: TokenCallback | None = None,
                 shown: str | None = None, user: AbstractBaseUser | None = None) -> ChatTurnResult:
    """Generate the answer of an opened turn while holding its lease (writer). Idempotent across
    instances: an answer already completed is only re-announced."""
    with translation.override(spec.get("language") or translation.get_language()):
        return _turn_execute(spec, writer, on_token=on_token, shown=shown, user=user)


def _turn_execute(spec: dict[str, Any], writer, *, on_token: TokenCallback | None, shown: str | None,
                  user: AbstractBaseUser | None) -> ChatTurnResult:
    from django.contrib.auth import get_user_model

    from .turn_stream import LeaseLost

    started = time.monotonic()
    reply = Message.objects.select_related("conversation").filter(pk=spec["message_id"]).first()
    if reply is None:
        exc = NotFound(gettext("No such conversation."), code="conversation_not_found")
        _emit_error(writer, exc)  # deleted while being answered
        raise exc
    conversation = reply.conversation
    if reply.status == Message.Status.COMPLETE:
        # The previous owner committed the answer and died before announcing it.
        result = _stored_result(reply)
        writer.emit({"type": "answer", **result.to_dict()})
        return result
    if user is None:
        user = get_user_model().objects.filter(pk=spec["user_id"], is_active=True).first()
    message = spec["message"]
    token = session_id_var.set(conversation.session_id)
    outcome = "error"
    answer_stream = _AnswerStream(writer, reply.pk, on_token, shown)
    try:
        if user is None:
            raise ApplicationError("authentication_failed", gettext("The account of this conversation is no longer active."),
                                   status=401)
        # Re-checked on a takeover: access may have changed since the turn started.
        kbs = _validate_knowledge_bases(user=user, knowledge_bases=spec.get("knowledge_bases"))
        state = session_state_get(conversation=conversation).data
        history = [{"role": t.get("role"), "content": t.get("content")} for t in state.get("turns") or []]
        ctx = TurnContext(user=user, session_id=conversation.session_id, conversation_id=conversation.pk,
                          message=message, query=contextualise(message, state),
                          knowledge_bases=[kb.slug for kb in kbs] if kbs else None, history=history)
        saved = spec.get("context")
        if saved:
            # A takeover: plugins were already called for this turn; don't call them twice.
            ctx.query = saved["query"]
            ctx.plugin_results = [PluginResult(**p) for p in saved["plugin_results"]]
            sources = [Source(**s) for s in saved["sources"]]
        else:
            run_turn_hooks("before_retrieval", ctx)
            if not ctx.skip_retrieval:
                from apps.knowledge.selectors import chunks_retrieve

                ctx.sources = list(chunks_retrieve(user=user, query=ctx.query, knowledge_bases=[kb.pk for kb in kbs]
                                                   if kbs else None, top_k=getattr(settings, "CHAT_TOP_K", 6)))
            run_turn_hooks("after_retrieval", ctx)
            sources = _sources(ctx)
            from dataclasses import asdict

            from .turn_stream import get_backend

            get_backend().spec_update(spec["turn_id"], {"context": {
                "query": ctx.query, "plugin_results": [r.to_dict() for r in ctx.plugin_results],
                "sources": [asdict(s) for s in sources]}})
            Message.objects.filter(pk=spec["user_message_id"]).update(query=ctx.query)

        generator_name = _generator_name(kbs)
        generation: Generation | None = None
        error: LLMUnavailable | None = None
        gen_started = time.monotonic()
        try:
            generation = get_generator(generator_name).generate(
                question=message, query=ctx.query, history=history, sources=sources, on_token=answer_stream)
            answer_stream.finish()
        except LLMUnavailable as exc:
            error = exc
        gen_seconds = time.monotonic() - gen_started
        metrics.llm_calls_total.labels(generator_name, "ok" if error is None else error.reason).inc()
        metrics.llm_latency_seconds.labels(generator_name).observe(gen_seconds)
        plugin_results = [r.to_dict() for r in ctx.plugin_results]

        if error is not None:
            if not writer.still_holds():
                raise LeaseLost(spec["turn_id"])
            with transaction.atomic():
                Message.objects.filter(pk=reply.pk, status=Message.Status.STREAMING).delete()
                Message.objects.filter(pk=spec["user_message_id"]).update(generator=generator_name,
                                                                         error_code=error.code)
            _append_turns(conversation, [{"role": "user", "content": message}], ctx.query)
            error.details = {**error.details, "session_id": conversation.session_id,
                             "user_message_id": spec["user_message_id"],
                             "sources": [citation_for(s) for s in sources], "plugin_results": plugin_results}
            outcome = "llm_unavailable"
            logger.warning("generator unavailable", extra={"generator": generator_name, "reason": error.reason})
            _emit_error(writer, error)
            raise error

        answer, cited = cited_numbers(generation.text or "", {s.n for s in sources})
        by_n = {s.n: s for s in sources}
        citations = [citation_for(by_n[n], generation.snippets.get(n)) for n in cited]
        latency_ms = round((time.monotonic() - started) * 1000, 1)
        usage = {"generator": generation.generator, "model": generation.model,
                 "prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
                 "total_tokens": (generation.prompt_tokens or 0) + (generation.completion_tokens or 0),
                 "latency_ms": latency_ms}

        # Fencing: a process that lost its lease (paused past it) must not complete the turn; the
        # conditional update below makes completion exactly-once even if two got this far.
        if not writer.still_holds():
            raise LeaseLost(spec["turn_id"])
        with transaction.atomic():
            completed = Message.objects.filter(pk=reply.pk, status=Message.Status.STREAMING).update(
                status=Message.Status.COMPLETE, content=answer, citations=citations, plugin_results=plugin_results,
                generator=generation.generator, prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens, latency_ms=latency_ms)
            if completed:
                _touch(conversation, message)
        if not completed:
            reply = Message.objects.select_related("conversation").filter(pk=reply.pk).first()
            if reply is None:
                raise NotFound(gettext("No such conversation."), code="conversation_not_found")
            result = _stored_result(reply)
        else:
            for kind in ("prompt", "completion"):
                if usage[f"{kind}_tokens"]:
                    metrics.llm_tokens_total.labels(generator_name, kind).inc(usage[f"{kind}_tokens"])
            _append_turns(conversation, [{"role": "user", "content": message}, {"role": "assistant", "content": answer}],
                          ctx.query)
            metrics.chat_turn_duration_seconds.labels(generation.generator).observe(time.monotonic() - started)
            result = ChatTurnResult(session_id=conversation.session_id, message_id=reply.pk,
                                    user_message_id=spec["user_message_id"], answer=answer, citations=citations,
                                    plugin_results=plugin_results, usage=usage, query=ctx.query,
                                    sources=[citation_for(s) for s in sources])
        outcome = "ok"
        try:
            writer.emit({"type": "answer", **result.to_dict()})
        except LeaseLost:
            pass  # committed: whoever holds the lease now re-announces the stored answer
        if completed:
            # Observation hooks run once per answer: in the process whose conditional update completed
            # it, after the answer is on its way. A stalled owner that lost its lease and the instance
            # that took the turn over both generate, but only one of them gets here. (If that process
            # dies between its commit and this line, the hook is not run: at most once, never twice.)
            ctx.answer = answer
            run_turn_hooks("after_answer", ctx)
        return result
    except (LeaseLost, LLMUnavailable):
        raise
    except ApplicationError as exc:
        _turn_failed(spec, reply.pk, exc.code)
        _emit_error(writer, exc)
        raise
    except Exception:
        _turn_failed(spec, reply.pk, "server_error")
        _emit_error(writer, ApplicationError("server_error", gettext("An unexpected error occurred; it has been logged.")))
        raise
    finally:
        metrics.chat_turns_total.labels(spec.get("channel") or "rest", outcome).inc()
        session_id_var.reset(token)


def _turn_failed(spec: dict[str, Any], reply_pk: int, code: str) -> None:
    try:
        with transaction.atomic():
            Message.objects.filter(pk=reply_pk, status=Message.Status.STREAMING).delete()
            Message.objects.filter(pk=spec["user_message_id"]).update(error_code=code)
    except Exception:
        logger.exception("could not record a failed turn")


def _touch(conversation: Conversation, first_message: str) -> None:
    fields = {"updated_at": timezone.now()}
    if not conversation.title:
        title = " ".join(first_message.split())
        fields["title"] = title if len(title) <= TITLE_CHARS else title[:TITLE_CHARS].rsplit(" ", 1)[0] + "…"
        conversation.title = fields["title"]
    Conversation.objects.filter(pk=conversation.pk).update(**fields)


__all__ = ["ChatTurnResult", "TurnHandle", "chat_turn", "turn_open", "turn_start", "turn_execute", "turn_takeover",
           "turns_reconcile", "turn_for_resume", "contextualise", "conversation_delete", "conversation_update",
           "feedback_submit", "new_session_id", "citation_for", "PluginResult"]
