"""Conversations: the database is the source of truth for history; the session store only caches it."""
from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils.translation import gettext_lazy as _


class Conversation(models.Model):
    # Public, unguessable id used in URLs and the websocket path; the integer pk never leaves the server.
    session_id = models.CharField(verbose_name=_("session id"), max_length=64, unique=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, verbose_name=_("owner"), on_delete=models.CASCADE, related_name="conversations")
    title = models.CharField(verbose_name=_("title"), max_length=200, blank=True)
    archived = models.BooleanField(verbose_name=_("archived"), default=False)
    created_at = models.DateTimeField(verbose_name=_("created at"), auto_now_add=True)
    updated_at = models.DateTimeField(verbose_name=_("updated at"), auto_now=True)

    class Meta:
        verbose_name = _("conversation")
        verbose_name_plural = _("conversations")
        ordering = ["-updated_at", "-id"]
        indexes = [models.Index(fields=["owner", "archived", "-updated_at"], name="conv_owner_recent")]

    def __str__(self) -> str:
        return f"{self.title or '(untitled)'} [{self.session_id}]"


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user", _("User")
        ASSISTANT = "assistant", _("Assistant")

    conversation = models.ForeignKey(Conversation, verbose_name=_("conversation"), on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(verbose_name=_("role"), max_length=16, choices=Role.choices)
    content = models.TextField(verbose_name=_("content"))
    # The retrieval query actually used (contextualised with recent turns); kept to explain an answer.
    query = models.TextField(verbose_name=_("query"), blank=True)
    citations = models.JSONField(verbose_name=_("citations"), default=list, blank=True)
    plugin_results = models.JSONField(verbose_name=_("plugin results"), default=list, blank=True)
    generator = models.CharField(verbose_name=_("generator"), max_length=32, blank=True)
    prompt_tokens = models.PositiveIntegerField(verbose_name=_("prompt tokens"), null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(verbose_name=_("completion tokens"), null=True, blank=True)
    latency_ms = models.FloatField(verbose_name=_("latency ms"), null=True, blank=True)
    # Set when generation failed (e.g. "llm_unavailable"); the turn is still recorded.
    error_code = models.CharField(verbose_name=_("error code"), max_length=64, blank=True)

    class Status(models.TextChoices):
        COMPLETE = "complete", _("Complete")
        STREAMING = "streaming", _("Streaming")

    # An answer is saved as it is generated ("streaming", content = the text so far) and completed
    # exactly once; turn_id names its event stream (apps/conversations/turn_stream.py).
    status = models.CharField(verbose_name=_("status"), max_length=16, choices=Status.choices, default=Status.COMPLETE)
    turn_id = models.CharField(verbose_name=_("turn id"), max_length=32, blank=True, db_index=True)
    created_at = models.DateTimeField(verbose_name=_("created at"), auto_now_add=True)

    class Meta:
        verbose_name = _("message")
        verbose_name_plural = _("messages")
        ordering = ["id"]
        indexes = [models.Index(fields=["conversation", "id"], name="msg_conv_order")]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:60]}"


class Feedback(models.Model):
    class Rating(models.TextChoices):
        UP = "up", _("Helpful")
        DOWN = "down", _("Not helpful")

    message = models.ForeignKey(Message, verbose_name=_("message"), on_delete=models.CASCADE, related_name="feedback")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, verbose_name=_("user"), on_delete=models.CASCADE, related_name="message_feedback")
    rating = models.CharField(verbose_name=_("rating"), max_length=8, choices=Rating.choices)
    comment = models.TextField(verbose_name=_("comment"), blank=True)
    created_at = models.DateTimeField(verbose_name=_("created at"), auto_now_add=True)
    updated_at = models.DateTimeField(verbose_name=_("updated at"), auto_now=True)

    class Meta:
        verbose_name = _("feedback")
        verbose_name_plural = _("feedbacks")
        constraints = [models.UniqueConstraint(fields=["message", "user"], name="feedback_one_per_user")]

    def __str__(self) -> str:
        return f"{self.rating} on message {self.message_id}"
