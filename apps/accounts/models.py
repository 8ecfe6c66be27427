"""Who a user is at an identity provider, and which Django groups a directory manages."""
from django.conf import settings
from django.contrib.auth.models import Group
from django.db import models
from django.utils.translation import gettext_lazy as _


class ExternalIdentity(models.Model):
    """A user's stable identity at one provider (``oidc:<issuer>`` + ``sub``, or ``ldap`` + DN).

    Sign-in looks users up by this, never by e-mail or user name: an identity provider that lets
    people choose their e-mail must not be able to hand someone a local administrator's account.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, verbose_name=_("user"), on_delete=models.CASCADE,
                             related_name="external_identities")
    provider = models.CharField(_("provider"), max_length=255)
    subject = models.CharField(_("subject"), max_length=255)
    created_at = models.DateTimeField(verbose_name=_("created at"), auto_now_add=True)
    last_login_at = models.DateTimeField(verbose_name=_("last login at"), null=True, blank=True)

    class Meta:
        verbose_name = _("external identity")
        verbose_name_plural = _("external identities")
        constraints = [models.UniqueConstraint(fields=["provider", "subject"], name="uniq_external_identity")]

    def __str__(self) -> str:
        return f"{self.provider} {self.subject}"


class DirectoryGroup(models.Model):
    """A Django group whose members a directory decides (at each sign-in through ``source``).

    Only such groups are taken away at sign-in when the directory no longer lists them; groups an
    administrator assigns by hand are never touched.
    """

    group = models.ForeignKey(Group, verbose_name=_("group"), on_delete=models.CASCADE, related_name="directory_links")
    source = models.CharField(_("source"), max_length=16, choices=[("oidc", _("OpenID Connect")), ("ldap", _("LDAP"))])

    class Meta:
        verbose_name = _("directory-managed group")
        verbose_name_plural = _("directory-managed groups")
        constraints = [models.UniqueConstraint(fields=["group", "source"], name="uniq_directory_group")]

    def __str__(self) -> str:
        return f"{self.group.name} ({self.source})"
