"""Test plugin that misbehaves on purpose (see README.md): sleeper."""
import time

from apps.plugins.base import BasePlugin, intent_hook


class Sleeper(BasePlugin):
    name = "sleeper"

    @intent_hook(intent="sleep_it", keywords=[r"\bsleep it\b"])
    def go(self, ctx):
        time.sleep(120)
        return "woke up"

