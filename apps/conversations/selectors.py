"""Reads of conversations. Every read is scoped to the owner: another user's conversation is
reported as not found (the same answer as a nonexistent one, so ids don't leak)."""
from __future__ import annotations

import re
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Count, QuerySet
from django.utils.translation import gettext

from apps.core.errors import ApplicationError, NotFound

from . import metrics
from .models import Conversation, Message
from .session_store import SessionState, get_session_store

SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
# Turns kept in the hot state: enough to contextualise follow-ups and give an LLM recent history.
STATE_TURNS = 20
STATE_TURN_CHARS = 2000


def session_id_validate(session_id: Any) -> str:
    if not isinstance(session_id, str) or not SESSION_ID_RE.match(session_id):
        raise ApplicationError("invalid_session_id",
                               gettext("A session id is 8 to 64 characters: letters, digits, '-' and '_'."),
                               details={"session_id": str(session_id)[:80]})
    return session_id


def conversation_list(*, user: AbstractBaseUser, archived: bool | None = False) -> QuerySet[Conversation]:
    """The user's conversations, most recent first; archived=None lists all."""
    qs = Conversation.objects.filter(owner=user)
    if archived is not None:
        qs = qs.filter(archived=archived)
    return qs.annotate(message_count=Count("messages")).order_by("-updated_at", "-id")


def conversation_find(*, user: AbstractBaseUser, session_id: str) -> Conversation | None:
    """The user's conversation, None when there is none; NotFound when it belongs to someone else."""
    session_id_validate(session_id)
    conversation = Conversation.objects.filter(session_id=session_id).first()
    if conversation is not None and conversation.owner_id != user.pk:
        raise NotFound(gettext("No such conversation."), code="conversation_not_found")
    return conversation


def conversation_get(*, user: AbstractBaseUser, session_id: str) -> Conversation:
    conversation = conversation_find(user=user, session_id=session_id)
    if conversation is None:
        raise NotFound(gettext("No such conversation."), code="conversation_not_found")
    return conversation


def message_list(*, user: AbstractBaseUser, session_id: str) -> QuerySet[Message]:
    conversation = conversation_get(user=user, session_id=session_id)
    return conversation.messages.all().prefetch_related("feedback").order_by("id")


def message_get_for_feedback(*, user: AbstractBaseUser, message_id: int) -> Message:
    message = (Message.objects.select_related("conversation")
               .filter(pk=message_id, conversation__owner=user).first())
    if message is None:
        raise NotFound(gettext("No such message."), code="message_not_found")
    if message.role != Message.Role.ASSISTANT:
        raise ApplicationError("feedback_not_allowed", gettext("Feedback is given on the assistant's answers only."),
                               details={"message_id": message_id})
    return message


def conversation_key(conversation: Conversation) -> str:
    """Identifies one conversation beyond its pk: a session id reused after a delete, or a database
    restored from a backup (pks handed out again), must not pick up another conversation's state."""
    return f"{conversation.pk}:{conversation.created_at.timestamp():.6f}"


def session_state_matches(data: dict[str, Any] | None, conversation: Conversation) -> bool:
    return bool(data) and data.get("conversation_key") == conversation_key(conversation)


def session_state_from_database(*, conversation: Conversation) -> dict[str, Any]:
    # A turn still being answered is not history yet (its answer is partial); it joins when completed.
    unfinished = conversation.messages.filter(status=Message.Status.STREAMING).exclude(turn_id="").values("turn_id")
    recent = list(conversation.messages.exclude(turn_id__in=unfinished).order_by("-id")
                  .values("role", "content", "query")[:STATE_TURNS])
    recent.reverse()
    last_query = next((m["query"] or m["content"] for m in reversed(recent) if m["role"] == "user"), "")
    return {
        "conversation_id": conversation.pk,
        "conversation_key": conversation_key(conversation),
        "owner_id": conversation.owner_id,
        "turns": [{"role": m["role"], "content": m["content"][:STATE_TURN_CHARS]} for m in recent],
        "last_query": last_query,
    }


def session_state_get(*, conversation: Conversation) -> SessionState:
    """The hot state of a conversation; rebuilt from the database when the store lost it
    (expired, flushed Redis, another region) so no context is ever lost."""
    store = get_session_store()
    state = store.get(conversation.session_id)
    if state is not None and session_state_matches(state.data, conversation):
        return state
    built = session_state_from_database(conversation=conversation)
    metrics.session_store_lookups_total.labels("database", "hit").inc()

    def keep_or_build(current: dict | None) -> dict | None:
        # A concurrent turn may have rebuilt it already; keep theirs (it may hold a newer turn).
        if session_state_matches(current, conversation):
            return None
        return built

    return store.update(conversation.session_id, keep_or_build) or SessionState(0, built)


def conversation_find_by_answer(*, user: AbstractBaseUser, answer: str) -> str | None:
    """The session id of the user's conversation whose answer is `answer` (the newest such), or None.
    OpenAI-style clients send the whole dialogue back instead of a conversation id; the last answer
    they quote identifies the conversation they continue."""
    answer = (answer or "").strip()
    if not answer:
        return None
    found = (Message.objects.filter(conversation__owner=user, conversation__archived=False,
                                    role=Message.Role.ASSISTANT, content=answer)
             .order_by("-id").values_list("conversation__session_id", flat=True).first())
    return found
