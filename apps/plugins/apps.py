from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class PluginsConfig(AppConfig):
    name = "apps.plugins"
    label = "plugins"
    verbose_name = _("Plugins")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Nothing here starts a process or imports plugin code: workers start on first use.
        from apps.conversations.hooks import register_turn_hook

        from . import metrics  # noqa: F401  (registers the plugin metrics)
        from .services import plugins_turn_hook, register_event_handlers

        register_event_handlers()
        register_turn_hook(plugins_turn_hook)
        try:
            from apps.core import cluster
        except ImportError:  # the cluster runtime is optional; the version check in services still heals
            return
        from . import registry

        cluster.register_reconciler("plugins", registry.reconcile)
        cluster.register_warmup("plugins", registry.warm_up)
        cluster.register_info("plugin_config_version", registry.config_version)
