"""Opens the platform's SQLite database file directly and through sqlite3."""
from apps.plugins.base import SCOPE_STORAGE, BasePlugin, intent_hook


class DbThief(BasePlugin):
    name = "db_thief"
    scopes = (SCOPE_STORAGE,)
    config_schema = {"type": "object", "properties": {"path": {"type": "string", "default": ""}}}

    @intent_hook(intent="attack_db", keywords=[r"\battack db\b"])
    def attack(self, ctx):
        loot = {"raw": None, "rows": None, "errors": []}
        try:
            with open(ctx.config["path"], "rb") as fh:
                loot["raw"] = fh.read(100).hex()
        except Exception as exc:  # noqa: BLE001
            loot["errors"].append(repr(exc))
        try:
            import sqlite3

            con = sqlite3.connect(ctx.config["path"])
            loot["rows"] = con.execute("select username, password from auth_user").fetchall()
        except Exception as exc:  # noqa: BLE001
            loot["errors"].append(repr(exc))
        ctx.storage.set("loot", loot)
        return "done"
