from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


# What an API key may be used for; each endpoint names the scope it needs (apps/core/scopes.py).
SCOPES: dict[str, str] = {
    "read": "read knowledge bases, documents, conversations and one's own profile",
    "search": "search knowledge bases",
    "chat": "chat (REST, websocket) and manage one's conversations and feedback",
    "manage": "change knowledge bases, documents and plugins (still within the user's permissions)",
    "keys": "create and revoke API keys (never wider or longer-lived than the key itself)",
}


def all_scopes() -> list[str]:
    return list(SCOPES)


class ApiKey(models.Model):
    """A personal API key. Only the SHA-256 of the secret is stored; `prefix` identifies it to humans.

    Keys carry 256 bits of randomness, so a fast hash is sufficient (nothing to brute-force).
    A key minted with another key records it as `parent`: its scopes and life are within the parent's,
    and revoking (or deleting) the parent revokes (deletes) it.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, verbose_name=_("user"), on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(verbose_name=_("name"), max_length=100, blank=True)
    prefix = models.CharField(verbose_name=_("prefix"), max_length=16, db_index=True)
    key_hash = models.CharField(verbose_name=_("key hash"), max_length=64, unique=True)
    created_at = models.DateTimeField(verbose_name=_("created at"), auto_now_add=True)
    expires_at = models.DateTimeField(verbose_name=_("expires at"), null=True, blank=True)
    revoked_at = models.DateTimeField(verbose_name=_("revoked at"), null=True, blank=True)
    last_used_at = models.DateTimeField(verbose_name=_("last used at"), null=True, blank=True)
    scopes = models.JSONField(verbose_name=_("scopes"), default=all_scopes, blank=True)
    parent = models.ForeignKey("self", verbose_name=_("parent"), null=True, blank=True, on_delete=models.CASCADE, related_name="children",
                               help_text=_("The key this key was created with (if any)."))
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, verbose_name=_("created by"), null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+", help_text=_("Who issued the key, when not its own user."))

    class Meta:
        verbose_name_plural = _("API keys")
        ordering = ["-created_at"]
        verbose_name = _("API key")
        permissions = [("revoke_any_apikey", "Can revoke any user's API keys")]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name or 'unnamed'}, {self.user})"

    @property
    def is_active(self) -> bool:
        now = timezone.now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    @property
    def status(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= timezone.now():
            return "expired"
        return "active"


class ParkedTask(models.Model):
    """A Celery task delivery given up on after CELERY_MAX_DELIVERIES deliveries (e.g. it kept killing
    its worker). Kept for an operator to inspect and, once the cause is fixed, re-queue."""

    task_id = models.CharField(verbose_name=_("task id"), max_length=255, unique=True)
    task_name = models.CharField(verbose_name=_("task name"), max_length=255, db_index=True)
    args = models.JSONField(verbose_name=_("args"), default=list, blank=True)
    kwargs = models.JSONField(verbose_name=_("kwargs"), default=dict, blank=True)
    deliveries = models.PositiveIntegerField(verbose_name=_("deliveries"), default=0)
    reason = models.CharField(verbose_name=_("reason"), max_length=300, blank=True)
    created_at = models.DateTimeField(verbose_name=_("created at"), auto_now_add=True)
    requeued_at = models.DateTimeField(verbose_name=_("requeued at"), null=True, blank=True)

    class Meta:
        verbose_name_plural = _("parked tasks")
        ordering = ["-created_at"]
        verbose_name = _("parked task")

    def __str__(self) -> str:
        return f"{self.task_name} {self.task_id}"
