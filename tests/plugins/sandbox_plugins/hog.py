"""Test plugin that misbehaves on purpose (see README.md): hog."""

from apps.plugins.base import BasePlugin, intent_hook


class Hog(BasePlugin):
    name = "hog"
    config_schema = {"type": "object", "properties": {"mode": {"type": "string", "default": "one_shot"}}}

    @intent_hook(intent="hog_it", keywords=[r"\bhog it\b"])
    def go(self, ctx):
        if ctx.config["mode"] == "one_shot":
            blob = bytearray(4 * 1024 ** 3)
            return f"allocated {len(blob)}"
        chunks = []
        while True:  # grows until the address-space limit stops it
            chunks.append(bytearray(16 * 1024 ** 2))

