"""Test plugin that misbehaves on purpose (see README.md): reader."""

from apps.plugins.base import BasePlugin, intent_hook


class Reader(BasePlugin):
    name = "reader"
    config_schema = {"type": "object", "properties": {"path": {"type": "string", "default": "/etc/hostname"}}}

    @intent_hook(intent="read_it", keywords=[r"\bread it\b"])
    def go(self, ctx):
        with open(ctx.config["path"]) as fh:
            return fh.read()

