"""Test plugin that misbehaves on purpose (see README.md): crasher."""
import os

from apps.plugins.base import BasePlugin, intent_hook


class Crasher(BasePlugin):
    name = "crasher"

    @intent_hook(intent="crash_it", keywords=[r"\bcrash it\b"])
    def go(self, ctx):
        os._exit(3)

