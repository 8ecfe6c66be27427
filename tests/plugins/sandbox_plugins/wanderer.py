"""Test plugin that misbehaves on purpose (see README.md): wanderer."""
import socket

from apps.plugins.base import SCOPE_HTTP, BasePlugin, intent_hook


class Wanderer(BasePlugin):
    name = "wanderer"
    scopes = (SCOPE_HTTP,)
    config_schema = {"type": "object", "properties": {
        "allowed_url": {"type": "string", "default": "", "x-allow-host": True},
        "target": {"type": "string", "default": ""},
        "raw": {"type": "boolean", "default": False}}}

    @intent_hook(intent="wander", keywords=[r"\bwander\b"])
    def go(self, ctx):
        target = ctx.config["target"]
        if ctx.config["raw"]:
            host, port = target.split(":")
            try:  # a plugin that swallows the refusal is still recorded as denied
                socket.create_connection((host, int(port)), timeout=2).close()
            except Exception:  # noqa: BLE001
                pass
            return "connected (supposedly)"
        return ctx.http.get(target).text

