"""Well-behaved: reports what its sandbox looks like from inside (uid, pid, hostname, files, network)."""
import os
import socket

from apps.plugins.base import SCOPE_STORAGE, BasePlugin, Result, intent_hook


class Introspect(BasePlugin):
    name = "introspect"
    scopes = (SCOPE_STORAGE,)
    config_schema = {"type": "object", "properties": {"paths": {"type": "array", "default": []}}}

    @intent_hook(intent="introspect_it", keywords=[r"\bintrospect it\b"])
    def go(self, ctx):
        with open("/proc/net/dev") as fh:
            interfaces = sorted(line.split(":")[0].strip() for line in fh.readlines()[2:])
        seen = {p: os.path.exists(p) for p in ctx.config["paths"]}
        with open("/proc/self/mountinfo") as fh:
            mounts = {line.split()[4]: line.split()[5] for line in fh}
        scratch = os.stat("/scratch")
        return Result(title="inside", content="inside the sandbox", data={
            "uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(), "hostname": socket.gethostname(),
            "root": sorted(os.listdir("/")), "processes": sorted(p for p in os.listdir("/proc") if p.isdigit()),
            "interfaces": interfaces, "seen": seen, "cwd": os.getcwd(), "env": sorted(os.environ),
            "mount_options": {m: mounts.get(m) for m in ("/", "/proc", "/scratch")},
            "scratch": [scratch.st_uid, oct(scratch.st_mode & 0o777)], "groups": os.getgroups()})
