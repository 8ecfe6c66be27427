"""A well-behaved plugin with a secret; the name thieves want its name (and its secret)."""
from apps.plugins.base import SCOPE_STORAGE, BasePlugin, Result, intent_hook


class Victim(BasePlugin):
    name = "victim"
    scopes = (SCOPE_STORAGE,)
    config_schema = {"type": "object", "properties": {"token": {"type": "string", "secret": True}}}

    def setup(self, config, storage):
        super().setup(config, storage)
        storage.set("setup_by", "victim.py")

    @intent_hook(intent="victim_it", keywords=[r"\bvictim it\b"])
    def go(self, ctx):
        return Result(title="victim", content="the real victim answered", data={"token_set": bool(ctx.config.get("token"))})
