from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils.translation import gettext_lazy as _


class AuditEvent(models.Model):
    """One change to an audited object: who, what, when, and a before/after summary.

    Rows are append-only: written by apps.monitoring.audit in the same transaction as the change
    they describe (a rolled-back change leaves no row), never edited or deleted through the app.
    Secret values never reach `changes` (masked by field name) and long values are abbreviated.
    """

    class Action(models.TextChoices):
        CREATE = "create", _("Create")
        UPDATE = "update", _("Update")
        DELETE = "delete", _("Delete")

    class Source(models.TextChoices):
        ADMIN = "admin", _("Admin console")
        API = "api", _("REST API")
        WEB = "web", _("Web page")
        COMMAND = "command", _("Management command")
        TASK = "task", _("Background task")
        SYSTEM = "system", _("System")

    created_at = models.DateTimeField(verbose_name=_("created at"), auto_now_add=True, db_index=True)
    # Kept when the user is deleted: actor_label is the durable record of who it was.
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, verbose_name=_("actor"), null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="+")
    actor_label = models.CharField(verbose_name=_("actor label"), max_length=200, db_index=True)
    source = models.CharField(verbose_name=_("source"), max_length=16, choices=Source.choices, db_index=True)
    action = models.CharField(verbose_name=_("action"), max_length=16, choices=Action.choices, db_index=True)
    model_label = models.CharField(verbose_name=_("model label"), max_length=100, db_index=True, help_text=_("app_label.ModelName"))
    object_id = models.CharField(verbose_name=_("object id"), max_length=64, db_index=True)
    object_repr = models.CharField(verbose_name=_("object repr"), max_length=200)
    # {"field": {"before": ..., "after": ...}} for fields; {"field": {"added": [...], "removed": [...]}}
    # for many-to-many relations.
    changes = models.JSONField(verbose_name=_("changes"), default=dict, blank=True)
    summary = models.TextField(verbose_name=_("summary"), blank=True)
    request_id = models.CharField(verbose_name=_("request id"), max_length=64, blank=True, db_index=True)

    class Meta:
        verbose_name_plural = _("audit events")
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["model_label", "object_id", "-created_at"], name="audit_object_recent")]
        verbose_name = _("audit event")
        # The auditor role's operational pages (apps/core/authz.py).
        permissions = [("view_dashboard", "Can view the operations dashboard"),
                       ("view_cluster", "Can view the cluster page")]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_label} {self.action} {self.model_label} {self.object_repr}"

    def save(self, *args, **kwargs):
        if self.pk is not None and not kwargs.get("force_insert"):
            raise ValueError("Audit events are append-only.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ValueError("Audit events are append-only.")
