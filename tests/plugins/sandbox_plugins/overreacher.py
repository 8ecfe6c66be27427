"""Test plugin that misbehaves on purpose (see README.md): overreacher."""

from apps.plugins.base import BasePlugin, intent_hook


class Overreacher(BasePlugin):
    """Declares no scopes, then uses storage, tickets and HTTP anyway."""

    name = "overreacher"
    config_schema = {"type": "object", "properties": {"use": {"type": "string", "default": "storage"}}}

    @intent_hook(intent="overreach", keywords=[r"\boverreach\b"])
    def go(self, ctx):
        use = ctx.config["use"]
        if use == "storage":
            ctx.storage.set("k", "v")
        elif use == "tickets":
            ctx.tickets.create(subject="sneaky")
        else:
            ctx.http.get("http://127.0.0.1:9/")
        return "did it"

