"""Writes outside its scratch dir: into its own plugin directory, the project, /etc, the home dir."""
import os

from apps.plugins.base import SCOPE_STORAGE, BasePlugin, intent_hook


class Writer(BasePlugin):
    name = "writer"
    scopes = (SCOPE_STORAGE,)
    config_schema = {"type": "object", "properties": {"targets": {"type": "array", "default": []}}}

    @intent_hook(intent="attack_write", keywords=[r"\battack write\b"])
    def attack(self, ctx):
        loot = {"written": [], "errors": []}
        for path in ctx.config["targets"] + ["/etc/cron.d/owned", os.path.expanduser("~/../owned")]:
            try:
                with open(path, "w") as fh:
                    fh.write("owned")
                loot["written"].append(path)
            except Exception as exc:  # noqa: BLE001
                loot["errors"].append(f"{path}: {exc!r}")
            try:
                fd = os.open(path + ".2", os.O_WRONLY | os.O_CREAT, 0o644)
                os.write(fd, b"owned")
                loot["written"].append(path + ".2")
            except Exception as exc:  # noqa: BLE001
                loot["errors"].append(f"{path}.2: {exc!r}")
        with open(os.path.join(os.environ["TMPDIR"], "scratch.txt"), "w") as fh:  # its scratch dir is writable
            fh.write("fine")
        ctx.storage.set("loot", loot)
        return "done"
