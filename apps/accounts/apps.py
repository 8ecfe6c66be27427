from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class AccountsConfig(AppConfig):
    verbose_name = _("Accounts")
    """Sign-in beyond local passwords: OpenID Connect and LDAP, with directory groups."""

    name = "apps.accounts"
    label = "accounts"
    default_auto_field = "django.db.models.BigAutoField"
