from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class CoreConfig(AppConfig):
    verbose_name = _("Core")
    name = "apps.core"
    label = "core"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import schema  # noqa: F401  (registers the OpenAPI auth extension)
        from . import auth_cache, cluster, cluster_admin, events

        events.register_handler("api_key_revoked", auth_cache.on_api_key_revoked)
        from . import identity

        events.register_handler("user_changed", identity.on_user_changed)
        identity.connect_signals()
        from . import login_limits

        login_limits.connect_signals()
        cluster.connect_celery()
        cluster_admin.install()

        from django.db.models.signals import post_migrate

        from .authz import roles_ensure

        # After every app's migrate (their permissions exist by then): the role groups and their permissions.
        post_migrate.connect(roles_ensure, dispatch_uid="core.roles_ensure")
        self._command_language()

    @staticmethod
    def _command_language() -> None:
        import os

        from django.utils import translation

        from .i18n import command_language

        if language := command_language(os.environ):
            translation.activate(language)
