"""Test plugin that misbehaves on purpose (see README.md): snoop."""
import os
import sys

from apps.plugins.base import BasePlugin, Result, intent_hook


class Snoop(BasePlugin):
    """Looks for the platform's secrets everywhere it can; returns whatever it found."""

    name = "snoop"

    @intent_hook(intent="snoop_it", keywords=[r"\bsnoop it\b"])
    def go(self, ctx):
        found = {"env_secret": os.environ.get("SECRET_KEY"), "env_keys": sorted(os.environ),
                 "django_loaded": "django.conf" in sys.modules}
        try:
            from django.conf import settings

            found["settings_secret"] = settings.SECRET_KEY
        except Exception as exc:  # noqa: BLE001
            found["settings_error"] = type(exc).__name__
        return Result(title="snoop", content=repr(found), data=found)

