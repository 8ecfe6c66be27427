"""OpenAI-compatible API under /v1/ (openai_compat.py translates). Authentication: the platform's API
keys as Bearer tokens; throttles, permissions, plugins and audit are those of the chat service."""
from __future__ import annotations

import time

from drf_spectacular.utils import extend_schema
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.core.authentication import ApiKeyAuthentication
from apps.core.errors import api_exception_handler
from apps.core.throttling import ChatRateThrottle, UserOrKeyRateThrottle

from .openai_compat import completion_body, completion_chunks, completion_request_parse, error_body, model_get, models_list
from .services import chat_turn, turn_start
from .streaming import EventStreamRenderer, event_stream_response


def openai_exception_handler(exc, context):
    """The platform's error mapping, re-shaped as {"error": {"message", "type", "param", "code"}}."""
    response = api_exception_handler(exc, context)
    if response is not None and isinstance(response.data, dict) and isinstance(response.data.get("error"), dict):
        err = response.data["error"]
        response.data = error_body(response.status_code, err.get("code") or "error", err.get("message") or "",
                                   err.get("details"))
    return response


class OpenAIView(APIView):
    authentication_classes = [ApiKeyAuthentication]
    api_key_scope = "chat"  # apps/core/scopes.py: the same scope as the rest of the chat
    renderer_classes = [JSONRenderer, EventStreamRenderer]

    def get_exception_handler(self):
        return openai_exception_handler


@extend_schema(exclude=True)
class ModelListView(OpenAIView):
    def get(self, request):
        return Response(models_list(user=request.user))


@extend_schema(exclude=True)
class ModelDetailView(OpenAIView):
    def get(self, request, model_id: str):
        return Response(model_get(user=request.user, model_id=model_id))


@extend_schema(exclude=True)
class ChatCompletionsView(OpenAIView):
    throttle_classes = [UserOrKeyRateThrottle, ChatRateThrottle]

    def post(self, request):
        parsed = completion_request_parse(user=request.user, body=request.data,
                                          session_header=request.headers.get("X-Session-ID"))
        created = int(time.time())
        kwargs = dict(user=request.user, session_id=parsed.session_id, message=parsed.message,
                      knowledge_bases=parsed.knowledge_bases, channel="openai")
        if parsed.stream:
            handle = turn_start(**kwargs)
            completion_id = f"chatcmpl-{handle.turn_id}"
            return event_stream_response(
                completion_chunks(handle.turn_id, request=parsed, completion_id=completion_id, created=created),
                X_Session_ID=handle.session_id, X_Turn_ID=handle.turn_id)
        result = chat_turn(**kwargs)
        body = completion_body(result.to_dict(), request=parsed, completion_id=f"chatcmpl-{result.message_id}",
                               created=created)
        return Response(body, headers={"X-Session-ID": result.session_id})
