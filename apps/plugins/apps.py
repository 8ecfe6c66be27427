from django.apps import AppConfig


class PluginsConfig(AppConfig):
    name = "apps.plugins"
    label = "plugins"
    default_auto_field = "django.db.models.BigAutoField"
