from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import Group
from django.db import models
from django.utils.translation import gettext_lazy as _


class PluginRegistryState(models.Model):
    """One row. `version` rises on every plugin change (the cluster-wide plugin config version);
    `discovery_version` rises when modules must be discovered again (manage.py plugins reload)."""

    version = models.PositiveBigIntegerField(verbose_name=_("version"), default=0)
    discovery_version = models.PositiveBigIntegerField(verbose_name=_("discovery version"), default=0)
    updated_at = models.DateTimeField(verbose_name=_("updated at"), auto_now=True)

    class Meta:
        verbose_name_plural = _("plugin registry states")
        verbose_name = _("plugin registry state")


class PluginConfig(models.Model):
    """The administrator's settings for one plugin. Rows override the plugin's schema defaults.

    Plugins start disabled. Secret config fields are stored encrypted in `secrets_encrypted` and are
    never shown back. An empty `allowed_groups` means every signed-in user may trigger the plugin.
    """

    name = models.CharField(verbose_name=_("name"), max_length=64, unique=True)
    enabled = models.BooleanField(verbose_name=_("enabled"), default=False)
    config = models.JSONField(verbose_name=_("config"), default=dict, blank=True)
    secrets_encrypted = models.TextField(verbose_name=_("secrets encrypted"), blank=True, default="")
    allowed_groups = models.ManyToManyField(Group, verbose_name=_("allowed groups"), blank=True, related_name="+",
                                            help_text=_("Only members of these groups trigger the plugin. "
                                                        "Empty: every signed-in user."))
    allowed_hosts = models.JSONField(verbose_name=_("allowed hosts"), default=list, blank=True,
                                     help_text=_("The only hosts the plugin's HTTP client may call "
                                                 "(host, host:port or *.domain); URL settings never allow their host."))
    granted_scopes = models.JSONField(verbose_name=_("granted scopes"), default=list, blank=True,
                                      help_text=_("Sensitive scopes the plugin declares and an administrator grants "
                                                  "(knowledge:read: chunk text in after_retrieval hooks)."))
    timeout_seconds = models.FloatField(verbose_name=_("timeout seconds"), null=True, blank=True,
                                        help_text=_("Wall-clock limit per call; empty: PLUGIN_TIMEOUT_SECONDS."))
    version = models.PositiveIntegerField(verbose_name=_("version"), default=1)
    updated_at = models.DateTimeField(verbose_name=_("updated at"), auto_now=True)
    updated_by = models.ForeignKey(settings.AUTH_USER_MODEL, verbose_name=_("updated by"), null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")

    class Meta:
        verbose_name_plural = _("plugins")
        ordering = ["name"]
        verbose_name = _("plugin")

    def __str__(self) -> str:
        return self.name


class PluginInvocation(models.Model):
    OUTCOMES = [("ok", _("ok")), ("error", _("error")), ("timeout", _("timeout")), ("denied", _("denied"))]

    plugin = models.CharField(verbose_name=_("plugin"), max_length=64)
    stage = models.CharField(verbose_name=_("stage"), max_length=32)
    intent = models.CharField(verbose_name=_("intent"), max_length=64, blank=True, default="")
    outcome = models.CharField(verbose_name=_("outcome"), max_length=16, choices=OUTCOMES)
    error_code = models.CharField(verbose_name=_("error code"), max_length=64, blank=True, default="")
    error_message = models.CharField(verbose_name=_("error message"), max_length=500, blank=True, default="")
    duration_ms = models.FloatField(verbose_name=_("duration ms"), default=0.0)
    confidence = models.FloatField(verbose_name=_("confidence"), null=True, blank=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, verbose_name=_("user"), null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="+")
    conversation_id = models.BigIntegerField(verbose_name=_("conversation id"), null=True, blank=True)
    created_at = models.DateTimeField(verbose_name=_("created at"), auto_now_add=True, db_index=True)

    class Meta:
        verbose_name = _("plugin invocation")
        verbose_name_plural = _("plugin invocations")
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["plugin", "created_at"])]

    def __str__(self) -> str:
        return f"{self.plugin} {self.stage} {self.outcome}"


class Ticket(models.Model):
    """A support ticket opened by the ticket_create plugin: the conversation handed to a human."""

    STATUSES = [("open", _("open")), ("in_progress", _("in progress")), ("resolved", _("resolved")), ("closed", _("closed"))]
    PRIORITIES = [("low", _("low")), ("normal", _("normal")), ("high", _("high")), ("urgent", _("urgent"))]

    number = models.CharField(verbose_name=_("number"), max_length=20, unique=True, null=True, blank=True, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, verbose_name=_("user"), on_delete=models.CASCADE, related_name="support_tickets")
    subject = models.CharField(verbose_name=_("subject"), max_length=200)
    description = models.TextField(verbose_name=_("description"), blank=True)
    transcript = models.JSONField(verbose_name=_("transcript"), default=list, blank=True)
    status = models.CharField(verbose_name=_("status"), max_length=16, choices=STATUSES, default="open")
    priority = models.CharField(verbose_name=_("priority"), max_length=16, choices=PRIORITIES, default="normal")
    assignee = models.ForeignKey(settings.AUTH_USER_MODEL, verbose_name=_("assignee"), null=True, blank=True, on_delete=models.SET_NULL,
                                 related_name="assigned_support_tickets", limit_choices_to={"is_staff": True})
    conversation_id = models.BigIntegerField(verbose_name=_("conversation id"), null=True, blank=True)
    session_id = models.CharField(verbose_name=_("session id"), max_length=100, blank=True, default="")
    source_plugin = models.CharField(verbose_name=_("source plugin"), max_length=64, blank=True, default="")
    created_at = models.DateTimeField(verbose_name=_("created at"), auto_now_add=True)
    updated_at = models.DateTimeField(verbose_name=_("updated at"), auto_now=True)

    class Meta:
        verbose_name_plural = _("support tickets")
        ordering = ["-created_at"]
        verbose_name = _("support ticket")

    def __str__(self) -> str:
        return f"{self.number or 'T-?'} {self.subject}"
