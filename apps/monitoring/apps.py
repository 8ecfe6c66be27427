from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class MonitoringConfig(AppConfig):
    name = "apps.monitoring"
    label = "monitoring"
    verbose_name = _("Monitoring and audit")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        import logging

        from django.conf import settings

        from . import admin_pages, audit, celery_signals, collectors
        from .metrics import instance_info

        instance_info.labels(settings.INSTANCE_ID).set(1)
        # Python warnings become log lines too, so every line a process writes is one JSON object.
        logging.captureWarnings(True)
        celery_signals.connect()
        # Other apps' models are looked up here, by label, after every app is loaded.
        audit.connect_audit_signals()
        admin_pages.install()
        collectors.install()
