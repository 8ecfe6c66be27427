"""/v1/: the OpenAI-compatible API (paths as OpenAI spells them, with or without a trailing slash)."""
from django.urls import re_path

from . import openai_views

urlpatterns = [
    re_path(r"^models/?$", openai_views.ModelListView.as_view(), name="openai-models"),
    re_path(r"^models/(?P<model_id>[^/]+)/?$", openai_views.ModelDetailView.as_view(), name="openai-model"),
    re_path(r"^chat/completions/?$", openai_views.ChatCompletionsView.as_view(), name="openai-chat-completions"),
]
