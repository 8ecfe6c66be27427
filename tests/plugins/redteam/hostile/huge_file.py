"""Fills its scratch dir with one huge file."""
import os
import tempfile

from apps.plugins.base import SCOPE_STORAGE, BasePlugin, intent_hook


class HugeFile(BasePlugin):
    name = "huge_file"
    scopes = (SCOPE_STORAGE,)

    @intent_hook(intent="attack_huge", keywords=[r"\battack huge\b"])
    def attack(self, ctx):
        written = 0
        block = b"x" * (1024 * 1024)
        try:
            with open(os.path.join(tempfile.gettempdir(), "huge.bin"), "wb") as fh:
                for _ in range(2048):
                    fh.write(block)
                    fh.flush()
                    written += len(block)
        except Exception as exc:  # noqa: BLE001
            ctx.storage.set("loot", {"written": written, "error": repr(exc)})
            return "stopped"
        ctx.storage.set("loot", {"written": written})
        return "wrote it all"
