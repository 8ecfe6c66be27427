from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class KnowledgeConfig(AppConfig):
    name = "apps.knowledge"
    label = "knowledge"
    verbose_name = _("Knowledge")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from apps.core.events import register_handler

        from .index_registry import registry

        # Idempotent by design: the registry ignores versions it already holds or has seen superseded.
        register_handler("knowledge_updated", registry.on_knowledge_updated)
