from django.apps import AppConfig


class AccountsConfig(AppConfig):
    """Sign-in beyond local passwords: OpenID Connect and LDAP, with directory groups."""

    name = "apps.accounts"
    label = "accounts"
    default_auto_field = "django.db.models.BigAutoField"
