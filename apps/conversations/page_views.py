"""The web chat page. The page itself is static HTML + JS; it talks to the same REST API and
websocket as every other client, so it needs no logic of its own."""
from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie

from .selectors import conversation_list
from .serializers import ConversationSerializer


def _knowledge_bases(user) -> list[dict]:
    try:
        from apps.knowledge.selectors import knowledge_bases_visible
    except ImportError:  # the knowledge app is optional for the page to render
        return []
    return [{"id": kb.pk, "slug": kb.slug, "name": kb.name} for kb in knowledge_bases_visible(user=user)]


@login_required
@ensure_csrf_cookie
def chat_page(request):
    conversations = ConversationSerializer(conversation_list(user=request.user)[:100], many=True).data
    return render(request, "conversations/chat.html", {
        "boot": {"user": request.user.get_username(), "conversations": conversations,
                 "knowledge_bases": _knowledge_bases(request.user), "is_staff": request.user.is_staff},
    })
