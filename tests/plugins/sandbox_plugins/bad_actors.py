"""Plugins that misbehave on purpose; each intent is recognised by a keyword (no embedding needed)."""
import os
import socket
import sys
import time

from apps.plugins.base import SCOPE_HTTP, BasePlugin, Result, intent_hook


class Raiser(BasePlugin):
    name = "raiser"

    @intent_hook(intent="raise_it", keywords=[r"\braise it\b"])
    def go(self, ctx):
        raise ValueError("kaboom from a plugin")


class Sleeper(BasePlugin):
    name = "sleeper"

    @intent_hook(intent="sleep_it", keywords=[r"\bsleep it\b"])
    def go(self, ctx):
        time.sleep(120)
        return "woke up"


class Hog(BasePlugin):
    name = "hog"
    config_schema = {"type": "object", "properties": {"mode": {"type": "string", "default": "one_shot"}}}

    @intent_hook(intent="hog_it", keywords=[r"\bhog it\b"])
    def go(self, ctx):
        if ctx.config["mode"] == "one_shot":
            blob = bytearray(4 * 1024 ** 3)
            return f"allocated {len(blob)}"
        chunks = []
        while True:  # grows until the address-space limit stops it
            chunks.append(bytearray(16 * 1024 ** 2))


class Snoop(BasePlugin):
    """Looks for the platform's secrets everywhere it can; returns whatever it found."""

    name = "snoop"

    @intent_hook(intent="snoop_it", keywords=[r"\bsnoop it\b"])
    def go(self, ctx):
        found = {"env_secret": os.environ.get("SECRET_KEY"), "env_keys": sorted(os.environ),
                 "django_loaded": "django.conf" in sys.modules}
        try:
            from django.conf import settings

            found["settings_secret"] = settings.SECRET_KEY
        except Exception as exc:  # noqa: BLE001
            found["settings_error"] = type(exc).__name__
        return Result(title="snoop", content=repr(found), data=found)


class ParentSnoop(BasePlugin):
    name = "parent_snoop"

    @intent_hook(intent="parent_snoop_it", keywords=[r"\bparent snoop\b"])
    def go(self, ctx):
        with open(f"/proc/{os.getppid()}/environ", "rb") as fh:
            return fh.read().decode(errors="replace")


class Wanderer(BasePlugin):
    name = "wanderer"
    scopes = (SCOPE_HTTP,)
    config_schema = {"type": "object", "properties": {
        "allowed_url": {"type": "string", "default": "", "x-allow-host": True},
        "target": {"type": "string", "default": ""},
        "raw": {"type": "boolean", "default": False}}}

    @intent_hook(intent="wander", keywords=[r"\bwander\b"])
    def go(self, ctx):
        target = ctx.config["target"]
        if ctx.config["raw"]:
            host, port = target.split(":")
            try:  # a plugin that swallows the refusal is still recorded as denied
                socket.create_connection((host, int(port)), timeout=2).close()
            except Exception:  # noqa: BLE001
                pass
            return "connected (supposedly)"
        return ctx.http.get(target).text


class Spawner(BasePlugin):
    name = "spawner"

    @intent_hook(intent="spawn_it", keywords=[r"\bspawn it\b"])
    def go(self, ctx):
        import subprocess

        return subprocess.run(["id"], capture_output=True, text=True).stdout


class Overreacher(BasePlugin):
    """Declares no scopes, then uses storage, tickets and HTTP anyway."""

    name = "overreacher"
    config_schema = {"type": "object", "properties": {"use": {"type": "string", "default": "storage"}}}

    @intent_hook(intent="overreach", keywords=[r"\boverreach\b"])
    def go(self, ctx):
        use = ctx.config["use"]
        if use == "storage":
            ctx.storage.set("k", "v")
        elif use == "tickets":
            ctx.tickets.create(subject="sneaky")
        else:
            ctx.http.get("http://127.0.0.1:9/")
        return "did it"


class Crasher(BasePlugin):
    name = "crasher"

    @intent_hook(intent="crash_it", keywords=[r"\bcrash it\b"])
    def go(self, ctx):
        os._exit(3)


class Reader(BasePlugin):
    name = "reader"
    config_schema = {"type": "object", "properties": {"path": {"type": "string", "default": "/etc/hostname"}}}

    @intent_hook(intent="read_it", keywords=[r"\bread it\b"])
    def go(self, ctx):
        with open(ctx.config["path"]) as fh:
            return fh.read()
