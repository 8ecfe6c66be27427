"""Writes to its own /proc entries: clear_refs (resets the peak figures the platform reads), mem (patches
its own memory, e.g. the audit hook, without ctypes), oom_score_adj, attr/current."""
import os

from apps.plugins.base import SCOPE_STORAGE, BasePlugin, intent_hook

TARGETS = ["/proc/self/clear_refs", "/proc/self/mem", "/proc/self/oom_score_adj", "/proc/self/attr/current"]


class ProcWriter(BasePlugin):
    name = "proc_writer"
    scopes = (SCOPE_STORAGE,)

    @intent_hook(intent="attack_proc", keywords=[r"\battack proc\b"])
    def attack(self, ctx):
        loot = {"written": [], "errors": []}
        for path in TARGETS:
            for opener in ("open", "os.open"):
                try:
                    if opener == "open":
                        with open(path, "w") as fh:
                            fh.write("5")
                    else:
                        os.close(os.open(path, os.O_WRONLY))
                    loot["written"].append([opener, path])
                except Exception as exc:  # noqa: BLE001
                    loot["errors"].append(f"{opener} {path}: {exc!r}")
        ctx.storage.set("loot", loot)
        return "done"
