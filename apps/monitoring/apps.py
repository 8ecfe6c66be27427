from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    name = "apps.monitoring"
    label = "monitoring"
    verbose_name = "Monitoring and audit"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.conf import settings

        from . import audit, celery_signals
        from .metrics import instance_info

        instance_info.labels(settings.INSTANCE_ID).set(1)
        celery_signals.connect()
        # Other apps' models are looked up here, by label, after every app is loaded.
        audit.connect_audit_signals()
