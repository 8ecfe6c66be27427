"""Allocates far more memory than its limit, at once and gradually."""
from apps.plugins.base import SCOPE_STORAGE, BasePlugin, intent_hook


class MemoryBomb(BasePlugin):
    name = "memory_bomb"
    scopes = (SCOPE_STORAGE,)

    @intent_hook(intent="attack_memory", keywords=[r"\battack memory\b"])
    def attack(self, ctx):
        chunks = []
        while True:
            chunks.append(bytearray(64 * 1024 ** 2))
