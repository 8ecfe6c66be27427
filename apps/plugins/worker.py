"""Sandbox worker: the only process where plugin code is imported and run.

Started by runner.py as `python -I -c BOOT <project root>` with a scrubbed environment (no Django
settings module, no secrets, no proxies) and a private temporary directory as working directory.
It speaks length-prefixed JSON frames on stdin/stdout; plugin output to stdout is redirected to
stderr so it cannot corrupt the protocol.

Containment inside the process (defence in depth; for hostile third-party code also run the web
process's workers under their own uid or container):
- RLIMIT_AS caps the address space, so a runaway allocation raises MemoryError here and the worker
  is recycled; the parent kills it on a wall-clock timeout.
- An audit hook (PEP 578, cannot be removed once installed) refuses: sockets to hosts outside the
  plugin's allow-list, starting processes, signalling other processes, writing files outside the
  private temp dir, and reading the platform's data directories or other processes' /proc entries.
Django-free by design: nothing here may import Django or the project's settings.
"""
from __future__ import annotations

import io
import ipaddress
import json
import os
import resource
import socket
import struct
import sys
import threading
import traceback
from typing import Any, BinaryIO

BOOT = ("import sys; sys.dont_write_bytecode = True; sys.path.insert(0, sys.argv[1]); "
        "from apps.plugins.worker import main; main()")
MAX_FRAME = 8 * 1024 * 1024
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    pass


def write_frame(stream: BinaryIO, message: dict[str, Any]) -> None:
    data = json.dumps(message, default=str, ensure_ascii=False).encode("utf-8")
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            raise EOFError("peer closed the pipe")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(stream: BinaryIO) -> dict[str, Any]:
    (length,) = _HEADER.unpack(_read_exact(stream, _HEADER.size))
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    return json.loads(_read_exact(stream, length))


# ---------------------------------------------------------------------------------------------
# Everything below runs only in the worker process.

_BLOCKED_EVENTS = {
    "subprocess.Popen": "starting processes", "os.system": "starting processes", "os.exec": "starting processes",
    "os.posix_spawn": "starting processes", "os.spawn": "starting processes", "os.fork": "forking",
    "os.forkpty": "forking", "os.kill": "signalling processes", "os.killpg": "signalling processes",
    "signal.pthread_kill": "signalling processes", "os.remove": "deleting files", "os.rmdir": "deleting files",
    "shutil.rmtree": "deleting files", "os.rename": "renaming files", "os.symlink": "creating links",
    "os.link": "creating links", "os.chmod": "changing permissions", "os.chown": "changing ownership",
    "os.truncate": "truncating files", "socket.bind": "listening on sockets", "ctypes.dlopen": "loading native code",
}


class Policy:
    """What the current operation may touch. Swapped per operation by the worker loop."""

    def __init__(self, denied_paths: list[str], tmp_dir: str, allowed_paths: list[str] = ()) -> None:
        self.denied_paths = [os.path.realpath(p) for p in denied_paths if p]
        # Plugin code may live under a denied tree (e.g. PLUGINS_DIR inside DATA_DIR): it stays readable.
        self.allowed_paths = [os.path.realpath(p) for p in allowed_paths if p]
        self.tmp_dir = os.path.realpath(tmp_dir)
        self.allowed_hosts: list[str] = []
        self.allowed_ips: set[str] = set()
        self.denials: list[dict[str, str]] = []
        self.guard = threading.local()

    def deny(self, code: str, message: str):
        from .base import PluginDenied

        self.denials.append({"code": code, "message": message[:300]})
        return PluginDenied(code, message)

    def reset(self, allowed_hosts: list[str]) -> None:
        self.allowed_hosts = list(allowed_hosts)
        self.allowed_ips = set()
        self.denials = []

    def _path_denied(self, path: str) -> str | None:
        real = os.path.realpath(path)
        if real.startswith("/proc/"):
            part = real.split("/")[2]
            if part.isdigit() and int(part) != os.getpid():
                return "reading other processes"
        if any(real == a or real.startswith(a + os.sep) for a in self.allowed_paths):
            return None
        for denied in self.denied_paths:
            if real == denied or real.startswith(denied + os.sep):
                return "reading platform data"
        return None

    def _host_ok(self, host: Any, port: Any) -> bool:
        from .httpclient import host_allowed

        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        if not isinstance(host, str):
            return False
        return host in self.allowed_ips or host_allowed(host, port if isinstance(port, int) else None,
                                                         self.allowed_hosts)

    def audit(self, event: str, args: tuple) -> None:
        if getattr(self.guard, "active", False):
            return
        reason = _BLOCKED_EVENTS.get(event)
        if reason is not None:
            raise self.deny("operation_not_allowed", f"plugins may not do {event} ({reason})")
        if event == "open":
            path, mode = args[0], args[1]
            if isinstance(path, bytes):
                path = os.fsdecode(path)
            if not isinstance(path, str):
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                      (isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing:
                real = os.path.realpath(path)
                if not (real == self.tmp_dir or real.startswith(self.tmp_dir + os.sep)) and real != os.devnull:
                    raise self.deny("operation_not_allowed", f"plugins may write files only under their temp dir, "
                                                             f"not {path!r}")
            why = self._path_denied(path)
            if why:
                raise self.deny("operation_not_allowed", f"plugins may not open {path!r} ({why})")
        elif event == "socket.getaddrinfo":
            host, port = args[0], args[1]
            if host is None:
                return
            if not self._host_ok(host, port):
                raise self.deny("host_not_allowed", f"host {host!r} is not in this plugin's allowed hosts")
            # Remember what an allowed name resolves to, so the connect that follows is recognised.
            self.guard.active = True
            try:
                for info in socket.getaddrinfo(host, port):
                    self.allowed_ips.add(info[4][0])
            except OSError:
                pass
            finally:
                self.guard.active = False
        elif event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
            address = args[1]
            if event == "socket.sendmsg" and address is None:
                return
            if not isinstance(address, tuple):
                raise self.deny("host_not_allowed", "plugins may not use local (unix) sockets")
            host, port = address[0], address[1]
            try:
                ipaddress.ip_address(host)
                is_ip = True
            except ValueError:
                is_ip = False
            if (is_ip and host in self.allowed_ips) or self._host_ok(host, port):
                return
            raise self.deny("host_not_allowed", f"address {host!r} is not in this plugin's allowed hosts")


class _Channel:
    def __init__(self, inp: BinaryIO, out: BinaryIO) -> None:
        self.inp, self.out = inp, out

    def send(self, message: dict[str, Any]) -> None:
        write_frame(self.out, message)

    def recv(self) -> dict[str, Any]:
        return read_frame(self.inp)

    def rpc(self, method: str, **args: Any) -> Any:
        from .base import PluginDenied, PluginError

        self.send({"op": "rpc", "method": method, "args": args})
        reply = self.recv()
        if reply.get("op") == "rpc_result":
            return reply.get("value")
        code, message = reply.get("code", "rpc_failed"), reply.get("message", "")
        if reply.get("outcome") == "denied":
            raise PluginDenied(code, message)
        raise PluginError(code, message)


class Storage:
    """ctx.storage (the plugin's namespace) and ctx.user_storage (the plugin's namespace for the current
    user). The web process picks the namespace; a plugin cannot name another plugin or user."""

    def __init__(self, channel: _Channel, scope: str) -> None:
        self._channel, self._scope = channel, scope

    def get(self, key: str, default: Any = None) -> Any:
        value = self._channel.rpc("storage.get", scope=self._scope, key=key)
        return default if value is None else value

    def set(self, key: str, value: Any, ttl: int | None = None) -> None:
        self._channel.rpc("storage.set", scope=self._scope, key=key, value=value, ttl=ttl)

    def delete(self, key: str) -> None:
        self._channel.rpc("storage.delete", scope=self._scope, key=key)

    def incr(self, key: str, delta: int = 1) -> int:
        return int(self._channel.rpc("storage.incr", scope=self._scope, key=key, delta=delta))


class Tickets:
    def __init__(self, channel: _Channel) -> None:
        self._channel = channel

    def create(self, *, subject: str, description: str = "", priority: str = "normal") -> dict[str, Any]:
        """Open a support ticket for the current user; returns {"id", "number", "status"}."""
        return self._channel.rpc("tickets.create", subject=subject, description=description, priority=priority)


class _NoTickets:
    def __init__(self, policy: Policy) -> None:
        self._policy = policy

    def create(self, **_kwargs: Any) -> dict[str, Any]:
        raise self._policy.deny("scope_missing", "this plugin does not declare the 'tickets:create' scope")


def _error_payload(exc: BaseException) -> dict[str, str]:
    from .base import PluginError

    if isinstance(exc, PluginError):
        return {"code": exc.code, "message": exc.message[:1000]}
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return {"code": "plugin_exception", "message": f"{type(exc).__name__}: {exc}"[:900] + where}


class Worker:
    def __init__(self, channel: _Channel, init: dict[str, Any]) -> None:
        self.channel = channel
        self.init = init
        self.policy = Policy(init.get("denied_paths", []), os.getcwd(),
                             [init.get("plugins_dir") or "", *(init.get("sys_path") or [])])
        self.cls = None
        self.instance = None
        self.version: int | None = None
        self.config: dict[str, Any] = {}
        self.scopes: list[str] = []
        self.allowed_hosts: list[str] = []

    # -- lifecycle ------------------------------------------------------------------------------
    def setup(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.teardown()
        self.config = msg.get("config") or {}
        self.scopes = list(msg.get("scopes") or [])
        self.allowed_hosts = list(msg.get("allowed_hosts") or [])
        self.version = msg.get("version")
        instance = self.cls()
        instance.setup(self.config, Storage(self.channel, "plugin"))
        self.instance = instance
        return {}

    def teardown(self) -> None:
        instance, self.instance = self.instance, None
        if instance is not None:
            instance.teardown()

    # -- hooks ----------------------------------------------------------------------------------
    def invoke(self, msg: dict[str, Any]) -> dict[str, Any]:
        from .base import HookContext, Identity, Result, SCOPE_TICKETS
        from .httpclient import HttpClient

        if self.instance is None:
            raise RuntimeError("invoke before setup")
        ctx_in = msg.get("ctx") or {}
        user = msg.get("user") or {}
        sources = [dict(s) for s in ctx_in.get("sources") or []]
        http = HttpClient(self.channel.rpc, timeout=float(msg.get("http_timeout") or 5.0))
        ctx = HookContext(
            stage=msg["stage"], message=ctx_in.get("message", ""), query=ctx_in.get("query", ""),
            intent=msg.get("intent"), confidence=msg.get("confidence"), slots=dict(msg.get("slots") or {}),
            user=Identity(id=user.get("id"), username=user.get("username", ""), email=user.get("email", ""),
                          groups=tuple(user.get("groups") or ())),
            config=self.config, history=list(ctx_in.get("history") or []), sources=sources,
            plugin_results=list(ctx_in.get("plugin_results") or []), answer=ctx_in.get("answer"),
            storage=Storage(self.channel, "plugin"), user_storage=Storage(self.channel, "user"), http=http,
            tickets=Tickets(self.channel) if SCOPE_TICKETS in self.scopes else _NoTickets(self.policy),
            conversation_id=ctx_in.get("conversation_id"),
        )
        original_query = ctx.query
        returned = getattr(self.instance, msg["method"])(ctx)
        if isinstance(returned, Result):
            result = returned.to_dict()
        elif isinstance(returned, str):
            result = {"title": self.cls.name, "content": returned, "data": {}, "url": None}
        elif isinstance(returned, dict):
            result = Result(**returned).to_dict()
        elif returned is None:
            result = None
        else:
            raise TypeError(f"hook returned {type(returned).__name__}; return a Result, str, dict or None")
        patch: dict[str, Any] = {}
        if ctx.query != original_query and isinstance(ctx.query, str):
            patch["query"] = ctx.query
        if ctx.skip_retrieval:
            patch["skip_retrieval"] = True
        if msg["stage"] == "after_retrieval":
            patch["source_keys"] = [s.get("key") for s in ctx.sources if isinstance(s, dict)]
        return {"result": result, "patch": patch}

    # -- loop -----------------------------------------------------------------------------------
    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        from .base import PluginError

        op = msg.get("op")
        self.policy.reset([])  # no sockets at all: HTTP goes through the platform over the pipe
        reply: dict[str, Any] = {"op": "done", "outcome": "ok"}
        try:
            if op == "setup":
                reply.update(self.setup(msg))
            elif op == "invoke":
                reply.update(self.invoke(msg))
            elif op in ("teardown", "shutdown"):
                self.teardown()
            elif op == "ping":
                pass
            else:
                raise RuntimeError(f"unknown op {op!r}")
        except MemoryError:
            reply = {"op": "done", "outcome": "error", "recycle": True,
                     "error": {"code": "memory_limit_exceeded",
                               "message": f"the plugin exceeded the {self.init.get('memory_limit_mb')} MB memory limit"}}
        except PluginError as exc:
            reply = {"op": "done", "outcome": exc.outcome, "error": _error_payload(exc)}
        except Exception as exc:  # noqa: BLE001 - any plugin failure is reported, never fatal to the worker
            reply = {"op": "done", "outcome": "error", "error": _error_payload(exc)}
        if self.policy.denials:
            # A forbidden attempt marks the whole call, even if the plugin caught the error and carried on.
            reply = {"op": "done", "outcome": "denied", "error": self.policy.denials[0], "result": None, "patch": {}}
        return reply


def _limit_memory(limit_mb: int | None) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limit_mb:
        limit = int(limit_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _watch_parent() -> None:
    """Exit when the web process dies, even if a plugin is stuck (nobody would ever kill us)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            threading.Event().wait(1.0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main() -> None:
    # The protocol owns the original stdout; anything a plugin prints goes to stderr instead.
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), write_through=True)
    channel = _Channel(sys.stdin.buffer, proto_out)
    _watch_parent()
    init = channel.recv()
    _limit_memory(init.get("memory_limit_mb"))
    worker = Worker(channel, init)
    sys.addaudithook(worker.policy.audit)

    from .discovery import discover, load_plugin_class

    for extra in reversed(init.get("sys_path") or []):
        sys.path.insert(1, extra)
    if init.get("mode") == "discover":
        found, errors = discover(plugins_dir=init.get("plugins_dir"), dotted_paths=init.get("dotted_paths") or [],
                                 entry_points=init.get("entry_points", True), builtins=init.get("builtins", True),
                                 skip=set(init.get("skip") or ()),
                                 on_import=lambda source, ref: channel.send({"op": "importing", "source": source,
                                                                             "ref": ref}))
        channel.send({"op": "catalogue", "plugins": [f.describe() for f in found],
                      "errors": [e.to_dict() for e in errors]})
        return
    spec = init["plugin"]
    try:
        worker.cls = load_plugin_class(spec["source"], spec["ref"], spec["name"])
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which records a load error
        channel.send({"op": "load_error", "error": _error_payload(exc)})
        return
    channel.send({"op": "ready", "plugin": worker.cls.describe()})
    while True:
        try:
            msg = channel.recv()
        except EOFError:
            # The web process went away without a shutdown: still give the plugin its teardown.
            try:
                worker.teardown()
            except Exception:  # noqa: BLE001
                pass
            break
        reply = worker.handle(msg)
        channel.send(reply)
        if msg.get("op") == "shutdown" or reply.get("recycle"):
            break
    os._exit(0)


if __name__ == "__main__":
    main()
