from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class ConversationsConfig(AppConfig):
    name = "apps.conversations"
    label = "conversations"
    default_auto_field = "django.db.models.BigAutoField"
    verbose_name = _("Conversations")

    def ready(self) -> None:
        from apps.core.cluster import register_reconciler
        from apps.core.events import register_handler

        from . import metrics  # noqa: F401  (registers the metrics on the monitoring registry)
        from .session_store import on_session_updated

        # Another instance changed a session: drop our cached copy (the cluster listener delivers it).
        register_handler("session_updated", on_session_updated)
        # An instance died while generating a turn: whoever notices first after its lease expired finishes it.
        # Web instances only: an orphaned answer is generated where chat runs (and is counted in its
        # metrics), not on a Celery worker busy with ingestion.
        register_reconciler("chat_turn_takeover", _turns_reconcile, kinds=("web",))


def _turns_reconcile() -> None:
    from .services import turns_reconcile

    turns_reconcile()
