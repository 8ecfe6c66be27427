"""Allocates far more memory than its limit, gradually; with `catch` it swallows the MemoryError itself
and answers as if nothing happened (only the web process's own reading of the worker can show it)."""
from apps.plugins.base import SCOPE_STORAGE, BasePlugin, intent_hook


class MemoryBomb(BasePlugin):
    name = "memory_bomb"
    scopes = (SCOPE_STORAGE,)
    config_schema = {"type": "object", "properties": {"catch": {"type": "boolean", "default": False}}}

    @intent_hook(intent="attack_memory", keywords=[r"\battack memory\b"])
    def attack(self, ctx):
        chunks = []
        try:
            while True:
                chunks.append(bytearray(8 * 1024 ** 2))
        except MemoryError:
            if not ctx.config["catch"]:
                raise
        got = len(chunks) * 8
        chunks.clear()
        ctx.storage.set("loot", {"allocated_mb": got})
        return "survived"
