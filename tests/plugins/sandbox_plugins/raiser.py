"""Test plugin that misbehaves on purpose (see README.md): raiser."""

from apps.plugins.base import BasePlugin, intent_hook


class Raiser(BasePlugin):
    name = "raiser"

    @intent_hook(intent="raise_it", keywords=[r"\braise it\b"])
    def go(self, ctx):
        raise ValueError("kaboom from a plugin")

