"""Sandbox worker: the only process where plugin code is imported and run.

Started by runner.py, normally inside bubblewrap (own user, pid, network, ipc, uts and mount
namespaces; read-only binds of the Python runtime, site-packages, the plugin contract and ONE
plugin's code; a size-capped tmpfs as its only writable place; no platform files, environment,
sockets or other processes). It speaks length-prefixed JSON frames on stdin/stdout; plugin output
to stdout is redirected to stderr so it cannot corrupt the protocol.

Before any plugin code is imported, the trusted bootstrap (main) in this process:
- sets rlimits: address space, CPU seconds, file size (SIGXFSZ restored to its default, so a
  plugin that writes past the limit dies and the web process records it), processes, no core dumps;
- installs a seccomp filter (kernel-enforced, all threads): starting processes (fork, vfork, clone
  without CLONE_THREAD, execve), IPv4/IPv6/packet sockets, ptrace, namespaces, mount, bpf, keyrings
  and similar kill the whole worker at once (the web process sees SIGSYS and records a violation);
- adds an audit hook (PEP 578) as a second line: it refuses the same operations one level up, plus
  ctypes, sqlite3, gc object walks and tracing, file writes outside the scratch dir and reads of
  platform paths, and reports every refusal to the web process immediately on the pipe. It holds no
  mutable state a plugin could flip: once a refusal is written to the pipe it cannot be taken back.
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
    "os.forkpty": "forking", "pty.spawn": "starting processes", "os.kill": "signalling processes",
    "os.killpg": "signalling processes", "signal.pthread_kill": "signalling processes",
    "os.chown": "changing ownership",
    "ctypes.dlopen": "loading native code", "ctypes.dlsym": "loading native code",
    "ctypes.call_function": "calling native code", "ctypes.addressof": "raw memory access",
    "ctypes.string_at": "raw memory access", "ctypes.wstring_at": "raw memory access",
    "ctypes.cdata": "raw memory access", "ctypes.cdata/buffer": "raw memory access",
    "sqlite3.connect": "opening databases", "sqlite3.enable_load_extension": "loading native code",
    "gc.get_objects": "walking the interpreter's objects", "gc.get_referrers": "walking the interpreter's objects",
    "gc.get_referents": "walking the interpreter's objects", "sys.settrace": "tracing the interpreter",
    "sys.setprofile": "tracing the interpreter", "sys._current_frames": "inspecting other threads",
    "os.add_dll_directory": "loading native code",
}
# File changes allowed only inside the scratch dir: event -> positions of its path arguments.
_SCRATCH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "shutil.rmtree": (0,), "os.rename": (0, 1),
                   "os.truncate": (0,), "os.chmod": (0,), "os.symlink": (0, 1), "os.link": (0, 1), "os.mkdir": (0,),
                   "os.utime": (0,), "os.chflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,)}
# Plugins have no network of their own: every socket operation is refused as host_not_allowed.
_NETWORK_EVENTS = frozenset({"socket.bind", "socket.connect", "socket.sendto", "socket.getaddrinfo",
                             "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo"})
_INET_FAMILIES = (socket.AF_INET, socket.AF_INET6) + ((socket.AF_PACKET,) if hasattr(socket, "AF_PACKET") else ())


class PipeWriter:
    """The protocol's write end. One lock for every writer (the loop, audit hooks in any thread).

    `inode` is the pipe as it was at start: the hook refuses to report into anything else, so a plugin
    that dup2()s /dev/null over the protocol fd to swallow its refusals kills its worker instead."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)
        self.lock = threading.RLock()

    def write(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, default=str, ensure_ascii=False).encode("utf-8")
        if len(data) > MAX_FRAME:
            raise ProtocolError(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
        frame = memoryview(_HEADER.pack(len(data)) + data)
        with self.lock:
            while frame:
                frame = frame[os.write(self.fd, frame):]


def make_audit_hook(*, writer: PipeWriter, scratch: str, denied_paths: tuple[str, ...],
                    readable: tuple[str, ...]):
    """An audit hook whose whole state lives in its closure, as immutable values or captured functions:
    monkeypatching os, builtins or this module afterwards changes nothing it uses (see the module doc)."""
    from types import MappingProxyType

    from .base import PluginDenied

    blocked = MappingProxyType(dict(_BLOCKED_EVENTS))
    network = frozenset(_NETWORK_EVENTS)
    scratch_events = MappingProxyType(dict(_SCRATCH_EVENTS))
    inet = tuple(_INET_FAMILIES)
    realpath, fsdecode, fstat, write, exit_ = os.path.realpath, os.fsdecode, os.fstat, os.write, os._exit
    sep, devnull = os.sep, os.devnull
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
    scratch = realpath(scratch)
    denied = tuple(realpath(p) for p in denied_paths if p)
    readable = tuple(realpath(p) for p in readable if p)
    fd, identity, pid, lock = writer.fd, writer.identity, os.getpid(), writer.lock
    pack, dumps = _HEADER.pack, json.dumps
    isinstance_, str_, bytes_, int_, len_, any_ = isinstance, str, bytes, int, len, any

    def report(code: str, message: str) -> PluginDenied:
        data = dumps({"op": "violation", "code": code, "message": message[:300]}).encode()
        try:
            st = fstat(fd)
            if (st.st_dev, st.st_ino) != identity:
                exit_(71)  # the protocol pipe was swapped out: fail closed, the web process sees the crash
            frame = pack(len_(data)) + data
            with lock:
                while frame:
                    frame = frame[write(fd, frame):]
        except OSError:
            exit_(71)
        return PluginDenied(code, message)

    def inside(path: str, roots: tuple[str, ...]) -> bool:
        return any_(path == r or path.startswith(r + sep) for r in roots)

    def hook(event: str, args: tuple) -> None:
        reason = blocked.get(event)
        if reason is not None:
            raise report("operation_not_allowed", f"plugins may not do {event} ({reason})")
        positions = scratch_events.get(event)
        if positions is not None:
            for i in positions:
                path = args[i] if len_(args) > i else None
                if isinstance_(path, bytes_):
                    path = fsdecode(path)
                if isinstance_(path, str_) and not inside(realpath(path), (scratch,)):
                    raise report("operation_not_allowed", f"plugins may change files only under their scratch dir "
                                                          f"({event} {path!r})")
            return
        if event in network:
            raise report("host_not_allowed", f"plugins have no network ({event}); use ctx.http, served by the platform")
        if event == "open":
            path, mode, flags = args[0], args[1], args[2]
            if isinstance_(path, bytes_):
                path = fsdecode(path)
            if not isinstance_(path, str_):
                return
            real = realpath(path)
            writing = (isinstance_(mode, str_) and any_(c in mode for c in "wax+")) or \
                      (isinstance_(flags, int_) and flags & write_flags)
            if writing and not inside(real, (scratch,)) and real != devnull:
                raise report("operation_not_allowed", f"plugins may write files only under their scratch dir, "
                                                      f"not {path!r}")
            if real.startswith("/proc/"):
                part = real.split("/")[2]
                if part.isdigit() and int_(part) != pid:
                    raise report("operation_not_allowed", f"plugins may not open {path!r} (other processes)")
            if not inside(real, readable) and inside(real, denied):
                raise report("operation_not_allowed", f"plugins may not open {path!r} (platform data)")
        elif event == "socket.__new__":
            if len_(args) > 1 and args[1] in inet:
                raise report("host_not_allowed", "plugins have no network; use ctx.http (served by the platform)")
        elif event == "socket.sendmsg" and len_(args) > 1 and args[1] is not None:
            raise report("host_not_allowed", "plugins have no network; use ctx.http (served by the platform)")

    return hook


# Seccomp (x86_64 and aarch64). Any other architecture runs without this layer (namespaces, rlimits
# and the audit hook still apply); docs/plugins.md says so.
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALLS = {
    "x86_64": {"clone": 56, "clone3": 435, "socket": 41, "seccomp": 317, "rt_sigaction": 13, "kill": [
        57, 58, 59, 322, 101, 272, 308, 165, 166, 155, 310, 311, 246, 320, 321, 323, 425, 248, 249, 250, 298,
        169, 175, 176, 313, 128, 282, 289]},
    "aarch64": {"clone": 220, "clone3": 435, "socket": 198, "seccomp": 277, "rt_sigaction": 134, "kill": [
        221, 281, 117, 97, 268, 40, 39, 41, 270, 271, 104, 294, 280, 282, 425, 217, 218, 219, 241, 142, 105,
        106, 273, 137, 74]},
}
# x86_64 kill list: fork vfork execve execveat ptrace unshare setns mount umount2 pivot_root process_vm_readv
# process_vm_writev kexec_load kexec_file_load bpf userfaultfd io_uring_setup add_key request_key keyctl
# perf_event_open reboot init_module delete_module finit_module, and rt_sigtimedwait signalfd signalfd4 (a
# pending SIGXFSZ/SIGXCPU could be consumed with them; aarch64: the same calls by their numbers).
# rt_sigaction on SIGXCPU (24) or SIGXFSZ (25) with a new action kills too: the kernel enforces the CPU and
# file-size limits with those signals, and the bootstrap set them to their default (fatal) action.
_LIMIT_SIGNALS = (24, 25)


def seccomp_program(machine: str) -> bytes:
    import struct as st

    nr = _SYSCALLS[machine]
    ld, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06
    kill, allow, enosys = 0x80000000, 0x7FFF0000, 0x00050000 | 38

    def ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return st.pack("HBBI", code, jt, jf, k)

    prog = [ins(ld, 4), ins(jeq, _AUDIT_ARCH[machine], 1, 0), ins(ret, kill), ins(ld, 0)]
    if machine == "x86_64":
        prog += [ins(jge, 0x40000000, 0, 1), ins(ret, kill)]          # the x32 ABI would dodge the numbers below
    prog += [ins(jeq, nr["clone3"], 0, 1), ins(ret, enosys)]          # glibc falls back to clone(), checked next
    prog += [ins(jeq, nr["clone"], 0, 4), ins(ld, 16), ins(jset, 0x00010000, 0, 1), ins(ret, allow), ins(ret, kill)]
    prog += [ins(jeq, nr["socket"], 0, 6), ins(ld, 16), ins(jeq, 2, 3, 0), ins(jeq, 10, 2, 0), ins(jeq, 17, 1, 0),
             ins(ret, allow), ins(ret, kill)]
    # rt_sigaction(sig, act, ...): sig in _LIMIT_SIGNALS and act != NULL (both 32-bit halves checked) -> kill.
    xcpu, xfsz = _LIMIT_SIGNALS
    prog += [ins(jeq, nr["rt_sigaction"], 0, 9), ins(ld, 16), ins(jeq, xfsz, 1, 0), ins(jeq, xcpu, 0, 4),
             ins(ld, 24), ins(jeq, 0, 0, 3), ins(ld, 28), ins(jeq, 0, 0, 1), ins(ret, allow), ins(ret, kill)]
    for number in nr["kill"]:
        prog += [ins(jeq, number, 0, 1), ins(ret, kill)]
    prog.append(ins(ret, allow))
    return b"".join(prog)


def install_seccomp() -> bool:
    """Load the filter into every thread of this process (TSYNC). False when the architecture is unknown."""
    import ctypes
    import platform

    machine = platform.machine()
    if machine not in _SYSCALLS:
        return False
    code = seccomp_program(machine)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
    prog = SockFprog(len(code) // 8, code)
    # seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog)
    if libc.syscall(_SYSCALLS[machine]["seccomp"], 1, 1, ctypes.byref(prog)) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter could not be installed")
    return True


def apply_limits(init: dict[str, Any]) -> None:
    """rlimits with hard == soft, so plugin code cannot raise them again."""
    import signal

    def cap(res: int, value: int | None) -> None:
        if value:
            resource.setrlimit(res, (int(value), int(value)))

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cap(resource.RLIMIT_AS, (init.get("memory_limit_mb") or 0) * 1024 * 1024)
    cap(resource.RLIMIT_CPU, init.get("cpu_seconds"))
    cap(resource.RLIMIT_FSIZE, (init.get("file_size_mb") or 0) * 1024 * 1024)
    cap(resource.RLIMIT_NPROC, init.get("max_processes"))
    cap(resource.RLIMIT_NOFILE, init.get("max_open_files"))
    # Python ignores SIGXFSZ; restored, a write past the file-size limit kills the worker (recorded).
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)


class _Channel:
    def __init__(self, inp: BinaryIO, writer: PipeWriter) -> None:
        self.inp, self.writer = inp, writer

    def send(self, message: dict[str, Any]) -> None:
        self.writer.write(message)

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
        self.cls = None
        self.instance = None
        self.version: int | None = None
        self.config: dict[str, Any] = {}

    # -- lifecycle ------------------------------------------------------------------------------
    def setup(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.teardown()
        self.config = msg.get("config") or {}
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
        from .base import HookContext, Identity, Result
        from .httpclient import HttpClient

        if self.instance is None:
            raise RuntimeError("invoke before setup")
        ctx_in = msg.get("ctx") or {}
        user = msg.get("user") or {}
        sources = [dict(s) for s in ctx_in.get("sources") or []]
        # Scopes are enforced by the web process when it serves these calls, not here.
        ctx = HookContext(
            stage=msg["stage"], message=ctx_in.get("message", ""), query=ctx_in.get("query", ""),
            intent=msg.get("intent"), confidence=msg.get("confidence"), slots=dict(msg.get("slots") or {}),
            user=Identity(id=user.get("id"), username=user.get("username", ""), email=user.get("email", ""),
                          groups=tuple(user.get("groups") or ())),
            config=self.config, history=list(ctx_in.get("history") or []), sources=sources,
            plugin_results=list(ctx_in.get("plugin_results") or []), answer=ctx_in.get("answer"),
            storage=Storage(self.channel, "plugin"), user_storage=Storage(self.channel, "user"),
            http=HttpClient(self.channel.rpc, timeout=float(msg.get("http_timeout") or 5.0)),
            tickets=Tickets(self.channel), conversation_id=ctx_in.get("conversation_id"),
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
        # Refusals were reported to the web process as they happened; it marks the call "denied" itself.
        usage = resource.getrusage(resource.RUSAGE_SELF)
        reply["cpu"] = round(usage.ru_utime + usage.ru_stime, 3)
        return reply


def _watch_parent() -> None:
    """Without a sandbox: exit when the web process dies, even if a plugin is stuck (bubblewrap's
    --die-with-parent does this in the sandbox)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            threading.Event().wait(1.0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _describe(units: list[dict[str, str]], channel: _Channel) -> None:
    """Describe the plugin at each location; the web process, not the module, decides the names."""
    from .discovery import describe_unit

    out = []
    for unit in units:
        channel.send({"op": "importing", "source": unit["source"], "ref": unit["ref"]})
        out.append(describe_unit(unit["source"], unit["ref"], unit["name"]))
    channel.send({"op": "catalogue", "units": out})


def drop_identity(uid: int, gid: int) -> None:
    """Root-started sandbox: become the host's unprivileged sandbox user (clears every capability) and
    own the scratch dir alone. Exits 72 (recorded by the web process) if anything is left over."""
    try:
        scratch = os.getcwd()
        os.chmod(scratch, 0o700)
        os.chown(scratch, uid, gid)
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        with open("/proc/self/status") as fh:
            caps = [line.split()[1] for line in fh if line.startswith(("CapPrm:", "CapEff:", "CapAmb:"))]
        ok = os.getresuid() == (uid, uid, uid) and os.getresgid() == (gid, gid, gid) and not os.getgroups() \
            and len(caps) == 3 and all(int(c, 16) == 0 for c in caps)
    except OSError:
        ok = False
    if not ok:
        os._exit(72)


def main() -> None:
    import site

    # The protocol owns the original stdout; anything a plugin prints goes to stderr instead.
    writer = PipeWriter(os.dup(1))
    os.dup2(2, 1)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), write_through=True)
    channel = _Channel(sys.stdin.buffer, writer)
    init = channel.recv()
    if init.get("drop_to"):
        # Before site-packages (.pth files run code) or any plugin module is touched.
        drop_identity(int(init["drop_to"][0]), int(init["drop_to"][1]))
    if not init.get("sandboxed"):
        _watch_parent()
    for extra in init.get("site_dirs") or []:
        site.addsitedir(extra)
    for extra in reversed(init.get("sys_path") or []):
        sys.path.insert(1, extra)
    # Everything the worker itself needs is imported before plugin code can run.
    from . import base, discovery, httpclient  # noqa: F401

    apply_limits(init)
    seccomp = install_seccomp() if init.get("seccomp", True) else False
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith("ctypes.")]:
        del sys.modules[name]  # re-importing ctypes needs dlopen, which the hook refuses
    sys.addaudithook(make_audit_hook(writer=writer, scratch=os.getcwd(),
                                     denied_paths=tuple(init.get("denied_paths") or ()),
                                     readable=tuple(init.get("readable_paths") or ())))
    if init.get("mode") == "describe":
        _describe(list(init.get("units") or []), channel)
        os._exit(0)
    spec = init["plugin"]
    worker = Worker(channel, init)
    try:
        worker.cls = discovery.load_plugin_class(spec["source"], spec["ref"], spec["name"])
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which records a load error
        channel.send({"op": "load_error", "error": _error_payload(exc)})
        os._exit(0)
    channel.send({"op": "ready", "seccomp": seccomp})
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
        # A worker to recycle stays until the web process, having read its figures (runner.py
        # limits_reached), kills it.
        if msg.get("op") == "shutdown":
            break
    os._exit(0)


if __name__ == "__main__":
    main()
