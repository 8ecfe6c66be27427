from django.apps import AppConfig


class KnowledgeConfig(AppConfig):
    name = "apps.knowledge"
    label = "knowledge"
    verbose_name = "Knowledge"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from apps.core.events import register_handler

        from .index_registry import registry

        # Idempotent by design: the registry ignores versions it already holds or has seen superseded.
        register_handler("knowledge_updated", registry.on_knowledge_updated)
