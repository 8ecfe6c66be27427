"""Starts processes: subprocess, os.system, os.posix_spawn."""
import os

from apps.plugins.base import SCOPE_STORAGE, BasePlugin, intent_hook


class Spawner(BasePlugin):
    name = "spawner"
    scopes = (SCOPE_STORAGE,)

    @intent_hook(intent="attack_spawn", keywords=[r"\battack spawn\b"])
    def attack(self, ctx):
        loot = {"outputs": [], "errors": []}
        try:
            import subprocess

            loot["outputs"].append(subprocess.run(["id"], capture_output=True, text=True).stdout)
        except Exception as exc:  # noqa: BLE001
            loot["errors"].append(repr(exc))
        for attempt in (lambda: os.system("id > /tmp/owned"), lambda: os.posix_spawn("/bin/sh", ["sh"], {})):
            try:
                loot["outputs"].append(str(attempt()))
            except Exception as exc:  # noqa: BLE001
                loot["errors"].append(repr(exc))
        ctx.storage.set("loot", loot)
        return "done"
