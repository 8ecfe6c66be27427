"""Tampers with its own sandbox objects, then tries what they forbid (subprocess, a write outside)."""
import os
import sys

from apps.plugins.base import SCOPE_STORAGE, BasePlugin, intent_hook


class Tamper(BasePlugin):
    name = "tamper"
    scopes = (SCOPE_STORAGE,)
    config_schema = {"type": "object", "properties": {"mode": {"type": "string", "default": "gc"}}}

    @intent_hook(intent="attack_tamper", keywords=[r"\battack tamper\b"])
    def attack(self, ctx):
        loot = {"steps": [], "errors": []}
        mode = ctx.config["mode"]

        def step(name, fn):
            try:
                loot["steps"].append([name, repr(fn())[:200]])
            except Exception as exc:  # noqa: BLE001
                loot["errors"].append(f"{name}: {exc!r}")

        if mode == "gc":
            import gc

            step("gc.get_objects", lambda: len(gc.get_objects()))
            step("gc.get_referrers", lambda: len(gc.get_referrers(sys.modules)))
        elif mode == "globals":
            # Flip what the old guard kept in reach: the module's tables and the functions it calls.
            import apps.plugins.worker as worker

            step("clear blocked events", lambda: worker._BLOCKED_EVENTS.clear())
            step("clear network events", lambda: setattr(worker, "_NETWORK_EVENTS", frozenset()))
            step("patch realpath", lambda: setattr(os.path, "realpath", lambda p, *a, **k: "/scratch/x"))
        elif mode == "frames":
            frame = sys._getframe()
            found = []
            while frame is not None:
                found += [k for k, v in frame.f_locals.items() if "policy" in k or "hook" in k or "denial" in k]
                frame = frame.f_back
            loot["frames"] = found
            step("settrace", lambda: sys.settrace(lambda *a: None))
        elif mode == "pipe":
            # Swap the protocol pipe for /dev/null so refusals go nowhere, then try something forbidden.
            null = os.open(os.devnull, os.O_WRONLY)
            for fd in range(3, 12):
                try:
                    os.dup2(null, fd)
                except OSError:
                    pass
        import subprocess

        step("subprocess", lambda: subprocess.run(["id"], capture_output=True).stdout)
        step("write outside", lambda: open("/etc/owned", "w").write("x"))
        ctx.storage.set("loot", loot)
        return "done"
