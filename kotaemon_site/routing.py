"""Websocket routes of every app, gathered in one list."""
from django.urls import path

from apps.conversations.consumers import ChatConsumer
from apps.core.consumers import EchoConsumer

websocket_urlpatterns = [
    path("ws/echo/", EchoConsumer.as_asgi()),
    # Any path segment is routed: the consumer answers a malformed session id with an error frame.
    path("ws/chat/<str:session_id>/", ChatConsumer.as_asgi()),
]
