"""Test plugin that misbehaves on purpose (see README.md): parent_snoop."""
import os

from apps.plugins.base import BasePlugin, intent_hook


class ParentSnoop(BasePlugin):
    name = "parent_snoop"

    @intent_hook(intent="parent_snoop_it", keywords=[r"\bparent snoop\b"])
    def go(self, ctx):
        with open(f"/proc/{os.getppid()}/environ", "rb") as fh:
            return fh.read().decode(errors="replace")

