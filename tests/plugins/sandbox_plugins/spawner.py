"""Test plugin that misbehaves on purpose (see README.md): spawner."""

from apps.plugins.base import BasePlugin, intent_hook


class Spawner(BasePlugin):
    name = "spawner"

    @intent_hook(intent="spawn_it", keywords=[r"\bspawn it\b"])
    def go(self, ctx):
        import subprocess

        return subprocess.run(["id"], capture_output=True, text=True).stdout

