"""REST API of conversations. Thin: parse, call a service or selector, serialise."""
from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from django.utils.translation import gettext
from apps.core.errors import ApplicationError
from apps.core.schema import paginated, server_sent_event
from apps.core.throttling import ChatRateThrottle, UserOrKeyRateThrottle

from .selectors import conversation_get, conversation_list, message_list
from .serializers import (ChatRequestSerializer, ChatResponseSerializer, ConversationSerializer,
                          ConversationUpdateSerializer, FeedbackRequestSerializer, FeedbackSerializer,
                          MessageSerializer)
from .services import chat_turn, conversation_delete, conversation_update, feedback_submit, turn_for_resume, turn_start
from .streaming import EventStreamRenderer, event_stream_response, last_event_id, rest_events

_ERRORS = {400: OpenApiResponse(description="Invalid input: error.code names the problem"),
           404: OpenApiResponse(description="conversation_not_found / knowledge_base_not_found"),
           429: OpenApiResponse(description="throttled (Retry-After header)")}


class ChatView(APIView):
    api_key_scope = "chat"  # apps/core/scopes.py
    throttle_classes = [UserOrKeyRateThrottle, ChatRateThrottle]
    renderer_classes = [JSONRenderer, EventStreamRenderer]

    @extend_schema(
        request=ChatRequestSerializer,
        responses={(200, "application/json"): ChatResponseSerializer,
                   (200, "text/event-stream"): server_sent_event(), **_ERRORS,
                   409: OpenApiResponse(description="conversation_archived / session_busy"),
                   503: OpenApiResponse(description="llm_unavailable: the message is saved; error.details holds "
                                                    "session_id, user_message_id and the retrieved sources")},
        summary="Ask a question; the answer cites its sources",
        description="Each [n] in `answer` is explained by the citation with the same `n`.",
        tags=["chat"],
    )
    def post(self, request):
        params = ChatRequestSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        if data.get("stream") or "text/event-stream" in request.headers.get("Accept", ""):
            handle = turn_start(user=request.user, session_id=data.get("session_id"), message=data["message"],
                                knowledge_bases=data.get("knowledge_bases") or None, channel="rest")
            return event_stream_response(rest_events(handle.turn_id), X_Session_ID=handle.session_id,
                                         X_Turn_ID=handle.turn_id)
        result = chat_turn(user=request.user, session_id=data.get("session_id"), message=data["message"],
                           knowledge_bases=data.get("knowledge_bases") or None, channel="rest")
        return Response(result.to_dict())


class TurnEventsView(APIView):
    api_key_scope = "chat"  # apps/core/scopes.py
    throttle_classes = [UserOrKeyRateThrottle]
    renderer_classes = [JSONRenderer, EventStreamRenderer]

    @extend_schema(
        parameters=[OpenApiParameter("after", int, description="Offset already received (or the Last-Event-ID "
                                                               "header); 0 replays the whole answer")],
        responses={(200, "text/event-stream"): OpenApiResponse(description="The rest of the turn's events"),
                   404: OpenApiResponse(description="turn_not_found (another user's, expired or unknown)")},
        summary="Resume a streamed answer from an offset, on any instance", tags=["chat"],
    )
    def get(self, request, turn_id: str):
        turn_id = turn_for_resume(user=request.user, turn_id=turn_id)
        return event_stream_response(rest_events(turn_id, last_event_id(request)), X_Turn_ID=turn_id)


class ConversationListView(APIView):
    api_key_scope = "chat"  # apps/core/scopes.py
    @extend_schema(
        parameters=[OpenApiParameter("archived", str, enum=["false", "true", "all"],
                                     description="Which conversations to list (default: not archived)")],
        responses=paginated(ConversationSerializer), operation_id="conversations_list",
        summary="Your conversations, most recent first", tags=["chat"],
    )
    def get(self, request):
        raw = request.query_params.get("archived", "false").lower()
        if raw not in ("false", "true", "all"):
            raise ApplicationError("invalid_parameter", gettext("archived is one of false, true, all."),
                                   details={"archived": raw})
        qs = conversation_list(user=request.user, archived=None if raw == "all" else raw == "true")
        paginator = LimitOffsetPagination()
        page = paginator.paginate_queryset(qs, request, view=self)
        return paginator.get_paginated_response(ConversationSerializer(page, many=True).data)


class ConversationDetailView(APIView):
    api_key_scope = "chat"  # apps/core/scopes.py
    @extend_schema(responses={200: ConversationSerializer, 404: _ERRORS[404]}, summary="One conversation",
                   tags=["chat"])
    def get(self, request, session_id: str):
        return Response(ConversationSerializer(conversation_get(user=request.user, session_id=session_id)).data)

    @extend_schema(request=ConversationUpdateSerializer, responses={200: ConversationSerializer, 404: _ERRORS[404]},
                   summary="Rename, archive or unarchive a conversation", tags=["chat"])
    def patch(self, request, session_id: str):
        params = ConversationUpdateSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        conversation = conversation_update(user=request.user, session_id=session_id, **params.validated_data)
        return Response(ConversationSerializer(conversation).data)

    @extend_schema(responses={204: None, 404: _ERRORS[404]}, summary="Delete a conversation and its messages",
                   tags=["chat"])
    def delete(self, request, session_id: str):
        conversation_delete(user=request.user, session_id=session_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class MessageListView(APIView):
    api_key_scope = "chat"  # apps/core/scopes.py
    @extend_schema(responses={200: paginated(MessageSerializer), 404: _ERRORS[404]},
                   operation_id="conversations_messages_list",
                   summary="Messages of a conversation, oldest first", tags=["chat"])
    def get(self, request, session_id: str):
        qs = message_list(user=request.user, session_id=session_id)
        paginator = LimitOffsetPagination()
        paginator.default_limit = 200
        page = paginator.paginate_queryset(qs, request, view=self)
        data = MessageSerializer(page, many=True, context={"user": request.user}).data
        return paginator.get_paginated_response(data)


class FeedbackView(APIView):
    api_key_scope = "chat"  # apps/core/scopes.py
    @extend_schema(request=FeedbackRequestSerializer, responses={200: FeedbackSerializer, 404: _ERRORS[404]},
                   summary="Rate an answer (up or down, optional comment); again replaces it", tags=["chat"])
    def post(self, request, message_id: int):
        params = FeedbackRequestSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        feedback = feedback_submit(user=request.user, message_id=message_id, **params.validated_data)
        return Response(FeedbackSerializer(feedback).data)
