"""The sandbox runtime in the web process: warm worker processes per plugin, wall-clock timeouts.

Each enabled plugin gets its own small pool of long-lived worker processes (worker.py), so one
plugin never shares an interpreter with another plugin's code or secrets, and a plugin that hangs
or blows its memory limit loses only its own worker, which is killed and replaced. Workers are
started on first use and reused (a warm call costs a pipe round trip).

With `sandbox="bwrap"` (the default) every worker, discovery workers included, runs inside
bubblewrap: its own user (uid 65534), pid, network, ipc, uts and cgroup namespaces, a mount
namespace holding only read-only binds of the Python runtime, the shared libraries, site-packages,
the plugin contract and that one plugin's code, a fresh /proc, a minimal /dev and a size-capped
tmpfs scratch dir; cleared environment; capabilities dropped; no further user namespaces; killed
with the web process. Without bubblewrap, untrusted plugins are refused (SandboxUnavailable);
`sandbox="none"` (PLUGIN_SANDBOX=none) explicitly runs them with only the in-process layers.

Nothing here reads Django settings: services.py builds RuntimeOptions and PluginSpecs and supplies
the RPC handler that serves storage, HTTP and ticket requests on the plugin's behalf.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .discovery import Unit, candidates, module_root
from .worker import BOOT, MAX_FRAME, ProtocolError, _HEADER, write_frame

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
OUTCOMES = ("ok", "error", "timeout", "denied")


@dataclass(frozen=True)
class RuntimeOptions:
    plugins_dir: str | None
    dotted_paths: tuple[str, ...] = ()
    memory_limit_mb: int = 512
    denied_paths: tuple[str, ...] = ()
    start_timeout: float = 15.0
    pool_size: int = 2
    entry_points: bool = True
    builtins: bool = True
    python: str = sys.executable
    sys_path: tuple[str, ...] = ()   # extra import paths for workers (e.g. a `pip install --target` dir)
    sandbox: str = "bwrap"           # bwrap | none (explicitly unsafe for untrusted plugins)
    cpu_seconds: int = 300           # RLIMIT_CPU over a worker's life; recycled before it runs out
    file_size_mb: int = 64           # RLIMIT_FSIZE
    scratch_mb: int = 64             # size of the tmpfs scratch dir
    max_processes: int = 64          # RLIMIT_NPROC (threads count; see sandbox_uid)
    # A root web process runs each sandbox worker as this host uid/gid (not as root behind a user namespace,
    # where the kernel exempts it from RLIMIT_NPROC); None keeps root's identity (not recommended).
    sandbox_uid: int | None = 65534
    sandbox_gid: int | None = 65534
    max_open_files: int = 256
    on_spawn: Callable[[str], None] | None = field(default=None, compare=False, hash=False)
    on_violation: Callable[[str, str, str], None] | None = field(default=None, compare=False, hash=False)


@dataclass(frozen=True)
class PluginSpec:
    """Everything a worker needs to run one plugin. `version` changes whenever any of it changes."""

    name: str
    source: str
    ref: str
    version: int
    config: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    scopes: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()


@dataclass
class CallOutcome:
    outcome: str                       # ok | error | timeout | denied
    duration: float = 0.0
    result: dict[str, Any] | None = None
    patch: dict[str, Any] = field(default_factory=dict)
    error_code: str | None = None
    error_message: str = ""


class RpcError(Exception):
    """Raised by an RPC handler; returned to the plugin, and a "denied" one marks the whole call."""

    def __init__(self, outcome: str, code: str, message: str) -> None:
        super().__init__(message)
        self.outcome, self.code, self.message = outcome, code, message


RpcHandler = Callable[[str, dict[str, Any]], Any]


class WorkerLost(Exception):
    def __init__(self, outcome: str, code: str, message: str) -> None:
        super().__init__(message)
        self.outcome, self.code, self.message = outcome, code, message


_warned: set[str] = set()


def _warn_once(problem: str) -> None:
    if problem not in _warned:
        _warned.add(problem)
        logger.warning("plugin sandbox unavailable: built-in plugins run without OS isolation, others are refused",
                       extra={"problem": problem})


def unit_binds(source: str, ref: str, options: RuntimeOptions) -> list[str]:
    """What one plugin location needs bound into its sandbox besides the runtime and site-packages."""
    if source == "dir":
        return [os.path.realpath(ref)]
    if source == "setting":
        root = module_root(ref.partition("=")[2] or ref, list(options.sys_path) + sys.path)
        if root is not None:
            real = os.path.realpath(root)
            if not any(real.startswith(d + os.sep) for d in site_dirs()):
                return [real]
    return []


def unit_sys_path(source: str, ref: str, options: RuntimeOptions) -> list[str]:
    if source == "setting":
        root = module_root(ref, list(options.sys_path) + sys.path)
        if root is not None:
            return [os.path.dirname(os.path.realpath(root))]
    return []


SCRATCH = "/scratch"
_BASE_ENV = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1",
             "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def _child_env(tmp_dir: str) -> dict[str, str]:
    # Built from nothing, not filtered from os.environ: a new secret variable can never leak by omission.
    return {"PATH": os.defpath, "HOME": tmp_dir, "TMPDIR": tmp_dir, **_BASE_ENV}


# bubblewrap's --die-with-parent is PR_SET_PDEATHSIG, which fires when the *thread* that started the
# process ends. Pools start replacements from short-lived threads, so every worker is started from
# this one long-lived thread instead.
_spawner_lock = threading.Lock()
_spawner: concurrent.futures.ThreadPoolExecutor | None = None


def _spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="plugin-spawner")
        executor = _spawner
    return executor.submit(subprocess.Popen, argv, **kwargs).result()


def _forget_spawner() -> None:
    global _spawner
    _spawner = None


os.register_at_fork(after_in_child=_forget_spawner)

_probe_lock = threading.Lock()
_probes: dict[tuple, str | None] = {}


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def base_python() -> str:
    """The real interpreter binary (a venv's python is a symlink into a directory we do not bind)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(os.path.realpath(p) for p in (paths["purelib"], paths["platlib"]) if os.path.isdir(p)))


def _contract_files() -> list[Path]:
    """The only project files a sandbox sees: the plugin contract, the worker and the built-ins."""
    plugins = ROOT / "apps" / "plugins"
    files = [ROOT / "apps" / "__init__.py"] + [plugins / n for n in
                                                ("__init__.py", "base.py", "worker.py", "discovery.py", "httpclient.py")]
    return files + sorted((plugins / "builtin").glob("*.py"))


def _system_binds() -> list[str]:
    args: list[str] = []
    for path in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32", "/usr/share/zoneinfo"):
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    prefix = os.path.realpath(sys.base_prefix)
    args += ["--ro-bind", prefix, prefix]
    exe = base_python()
    if not exe.startswith(prefix + os.sep):
        args += ["--ro-bind", exe, exe]
    return args


def host_identity(options: RuntimeOptions) -> tuple[int, int] | None:
    """The host uid/gid a sandbox worker is switched to: only when this process is root (a non-root web
    process's workers are that unprivileged user already)."""
    if options.sandbox != "bwrap" or options.sandbox_uid is None or os.geteuid() != 0:
        return None
    gid = options.sandbox_gid if options.sandbox_gid is not None else options.sandbox_uid
    return int(options.sandbox_uid), int(gid)


# Placeholders for the two set-up pipes of a root-started sandbox (see _start_sandbox).
_INFO_FD, _BLOCK_FD = "{info-fd}", "{userns-block-fd}"


def bwrap_argv(options: RuntimeOptions, binds: list[str], *, disable_userns: bool = True) -> list[str]:
    drop = host_identity(options)
    argv = [bwrap_path() or "bwrap", "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--hostname", "plugin", "--die-with-parent", "--new-session",
            "--clearenv"]
    if drop is None:
        # The calling (unprivileged) user is uid 65534 inside, and nobody else is mapped.
        argv += ["--uid", "65534", "--gid", "65534", "--cap-drop", "ALL"]
        if disable_userns:
            argv.append("--disable-userns")
    else:
        # Root: bubblewrap sets the sandbox up as root of a new user namespace whose only other mapped
        # identity is the host's sandbox uid/gid (the web process writes that map, _start_sandbox); the
        # worker's trusted bootstrap switches to it before any plugin or site-packages code runs, which
        # clears every capability. Further user namespaces are refused by seccomp (bubblewrap's
        # --disable-userns cannot be combined with an externally written map).
        argv += ["--uid", "0", "--gid", "0", "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add",
                 "CAP_SETGID", "--cap-add", "CAP_CHOWN", "--info-fd", _INFO_FD, "--userns-block-fd", _BLOCK_FD]
    for key, value in {"PATH": "/nonexistent", "HOME": SCRATCH, "TMPDIR": SCRATCH, **_BASE_ENV}.items():
        argv += ["--setenv", key, value]
    # A fresh /proc for the pid namespace, mounted read-only: no writes to /proc/self/mem, clear_refs
    # (which would reset the peak figures the web process reads), oom_score_adj, attr...
    argv += ["--proc", "/proc", "--remount-ro", "/proc", "--dev", "/dev",
             "--size", str(options.scratch_mb * 1024 * 1024), "--tmpfs", SCRATCH]
    mounts = list(_system_binds())
    for path in _contract_files():
        if path.exists():
            mounts += ["--ro-bind", str(path), str(path)]
    for path in site_dirs() + [os.path.realpath(p) for p in options.sys_path if os.path.exists(p)]:
        mounts += ["--ro-bind", path, path]
    for path in dict.fromkeys(binds):
        if os.path.exists(path):
            mounts += ["--ro-bind", path, path]
    if drop is not None:
        # bubblewrap creates missing parents of mount points 0700 and owned by the set-up user: the
        # worker's uid could not walk them. Create each one world-traversable first.
        parents: dict[str, None] = {}
        for i, arg in enumerate(mounts):
            if arg == "--ro-bind":
                parent = os.path.dirname(mounts[i + 2])
                chain = []
                while parent not in ("/", ""):
                    chain.append(parent)
                    parent = os.path.dirname(parent)
                parents.update(dict.fromkeys(reversed(chain)))
        for parent in sorted(parents, key=lambda d: d.count("/")):
            argv += ["--perms", "0755", "--dir", parent]
    argv += mounts
    # The sandbox's root (bubblewrap's own tmpfs holding the mount points) read-only: the scratch dir is
    # the one writable place.
    argv += ["--remount-ro", "/", "--chdir", SCRATCH, "--"]
    return argv


def _start_sandbox(argv: list[str], options: RuntimeOptions, *, spawn: Callable[..., subprocess.Popen],
                   timeout: float = 30.0, **kwargs: Any) -> subprocess.Popen:
    """Start bubblewrap. Started by root, it blocks until this process has written the user namespace's
    map: inside 0 = the host's root (the set-up user, never seen by plugin code) and the sandbox uid/gid
    = the same host uid/gid, so the worker runs as that unprivileged host user."""
    drop = host_identity(options)
    if drop is None:
        return spawn(argv, **kwargs)
    info_r, info_w = os.pipe()
    block_r, block_w = os.pipe()
    argv = [str(info_w) if a == _INFO_FD else str(block_r) if a == _BLOCK_FD else a for a in argv]
    try:
        proc = spawn(argv, pass_fds=(info_w, block_r), **kwargs)
    except BaseException:
        for fd in (info_r, info_w, block_r, block_w):
            os.close(fd)
        raise
    os.close(info_w)
    os.close(block_r)
    try:
        import re

        data, deadline = b"", time.monotonic() + timeout
        # Read the whole report: closing the pipe while bubblewrap still writes to it kills bubblewrap (EPIPE).
        while (match := re.search(rb'"child-pid":\s*(\d+)', data)) is None or not data.rstrip().endswith(b"}"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([info_r], [], [], remaining)[0]:
                raise OSError("bubblewrap did not report its sandbox in time")
            chunk = os.read(info_r, 4096)
            if not chunk:
                raise OSError("bubblewrap exited before its sandbox was set up")
            data += chunk
        child = int(match.group(1))
        uid, gid = drop
        for name, ident in (("uid_map", uid), ("gid_map", gid)):
            with open(f"/proc/{child}/{name}", "w") as fh:
                fh.write(f"0 0 1\n{ident} {ident} 1\n")
        os.write(block_w, b"1")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        os.close(info_r)
        os.close(block_w)
    return proc


def sandbox_problem(options: RuntimeOptions) -> str | None:
    """None when bubblewrap works here (probed once per process), else why not."""
    exe = bwrap_path()
    if exe is None:
        return ("bubblewrap (bwrap) is not installed: install the Debian package `bubblewrap`, or set "
                "PLUGIN_SANDBOX=none to run untrusted plugins without OS isolation (unsafe)")
    key = (exe, base_python(), options.scratch_mb, host_identity(options))
    with _probe_lock:
        if key in _probes:
            return _probes[key]
        problem = None
        drop = host_identity(options)
        # Root-started: also prove the switch to the sandbox user works (and that it can read the runtime).
        code = "print('ok')" if drop is None else (f"import os; os.setgroups([]); os.setresgid({drop[1]}, {drop[1]}, {drop[1]}); "
                                                  f"os.setresuid({drop[0]}, {drop[0]}, {drop[0]}); import json; print('ok')")
        for disable_userns in (True, False):
            argv = bwrap_argv(options, [], disable_userns=disable_userns) + [base_python(), "-I", "-S", "-c", code]
            try:
                proc = _start_sandbox(argv, options, spawn=subprocess.Popen, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env={"PATH": os.defpath}, cwd="/")
                out, err = proc.communicate(timeout=30)
                done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
            except (OSError, subprocess.TimeoutExpired) as exc:
                problem = f"bubblewrap could not start: {exc}"
                continue
            if done.returncode == 0 and done.stdout.strip() == b"ok":
                problem = None
                _probes[("userns",) + key] = None if disable_userns else "no --disable-userns"
                break
            problem = ("bubblewrap cannot create the sandbox here (user namespaces disabled?): "
                       + done.stderr.decode(errors="replace").strip()[:300])
        _probes[key] = problem
        return problem


# Signals a worker dies of when the kernel enforces a limit: (outcome, code, message).
_SIGNAL_OUTCOMES = {
    signal.SIGSYS: ("denied", "sandbox_violation",
                    "the plugin made a forbidden system call (process start, network socket, namespace, ptrace...) "
                    "and the kernel killed its worker"),
    signal.SIGXCPU: ("error", "cpu_limit_exceeded", "the worker used up its CPU-time limit"),
    signal.SIGXFSZ: ("error", "file_size_limit_exceeded", "the plugin wrote a file past the size limit"),
}


def exit_outcome(returncode: int | None, sandboxed: bool) -> tuple[str, str, str]:
    """Why a worker exited: bubblewrap reports a child killed by signal N as 128 + N."""
    signum = None
    if returncode is not None and returncode < 0:
        signum = -returncode
    elif sandboxed and returncode is not None and returncode > 128:
        signum = returncode - 128
    if signum in _SIGNAL_OUTCOMES:
        return _SIGNAL_OUTCOMES[signum]
    if returncode == 71:
        return ("denied", "sandbox_tampered", "the plugin tampered with its sandbox's protocol pipe")
    if returncode == 72:
        return ("error", "sandbox_setup_failed", "the worker could not switch to the unprivileged sandbox user")
    return ("error", "worker_crashed", f"the worker process exited (status {returncode})")


def _status_field(status: bytes, name: bytes, base: int) -> int:
    """One number from a /proc/<pid>/status text (0 when absent)."""
    at = status.find(name)
    if at < 0:
        return 0
    end = status.find(b"\n", at)
    try:
        return int(status[at + len(name):end if end >= 0 else None].split()[0], base)
    except (ValueError, IndexError):
        return 0


class WorkerProcess:
    """One sandbox worker and its pipe protocol. Not thread-safe: a pool lends it to one caller at a time."""

    def __init__(self, init: dict[str, Any], options: RuntimeOptions, *, binds: list[str] = (),
                 trusted: bool = False, label: str = "") -> None:
        self.version: int | None = None
        self.buffer = bytearray()
        self.violations: list[dict[str, str]] = []
        self.options = options
        self.label = label
        self.cpu = 0.0
        self.peak = 0                     # the address-space peak already judged (bytes)
        self._worker_pid: int | None = None
        self._status_fd: int | None = None   # the worker's /proc/<pid>/status, kept open (pread per call)
        self._scratch_fd: int | None = None  # its scratch tmpfs, kept open (fstatvfs per call)
        self.sandboxed = options.sandbox == "bwrap"
        if self.sandboxed:
            problem = sandbox_problem(options)
            if problem is not None:
                if not trusted:
                    raise WorkerLost("error", "sandbox_unavailable", problem)
                # Built-in plugins are platform code: without bubblewrap they still run, with the other layers.
                _warn_once(problem)
                self.sandboxed = False
        self.tmp_dir = tempfile.mkdtemp(prefix="kotaemon-plugin-")
        if self.sandboxed:
            userns = _probes.get(("userns", bwrap_path(), base_python(), options.scratch_mb,
                                  host_identity(options))) is None
            argv = bwrap_argv(options, list(binds), disable_userns=userns) + [base_python(), "-I", "-S", "-c", BOOT,
                                                                                    str(ROOT)]
            env, cwd = {"PATH": os.defpath}, "/"
        else:
            argv, env, cwd = [options.python, "-I", "-c", BOOT, str(ROOT)], _child_env(self.tmp_dir), self.tmp_dir
        try:
            if self.sandboxed:
                self.proc = _start_sandbox(argv, options, spawn=_spawn, timeout=max(options.start_timeout, 30),
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, cwd=cwd,
                                           env=env, close_fds=True)
            else:
                self.proc = _spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, cwd=cwd,
                                   env=env, close_fds=True)
        except OSError as exc:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            raise WorkerLost("error", "worker_start_failed", f"could not start a plugin worker: {exc}") from None
        self.started = time.monotonic()
        init = dict(init, memory_limit_mb=options.memory_limit_mb, denied_paths=list(options.denied_paths),
                    sys_path=list(options.sys_path) + list(init.get("extra_sys_path") or []),
                    site_dirs=site_dirs() if self.sandboxed else [],
                    sandboxed=self.sandboxed, cpu_seconds=options.cpu_seconds, file_size_mb=options.file_size_mb,
                    drop_to=list(host_identity(options) or ()) if self.sandboxed else [],
                    max_processes=options.max_processes if self.sandboxed else None,
                    max_open_files=options.max_open_files,
                    # A module's own byte-code cache is looked up beside it (not bound: the lookup just misses).
                    readable_paths=list(binds) + [os.path.join(os.path.dirname(b), "__pycache__") for b in binds]
                    + list(options.sys_path))
        try:
            write_frame(self.proc.stdin, init)
        except (OSError, ValueError) as exc:
            self.kill()
            raise WorkerLost("error", "worker_start_failed", f"the plugin worker died at start: {exc}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def read(self, deadline: float) -> dict[str, Any]:
        import json

        fd = self.proc.stdout.fileno()
        while True:
            if len(self.buffer) >= _HEADER.size:
                (length,) = _HEADER.unpack(self.buffer[:_HEADER.size])
                if length > MAX_FRAME:
                    raise WorkerLost("error", "protocol_error", f"worker sent a frame of {length} bytes")
                if len(self.buffer) >= _HEADER.size + length:
                    data = bytes(self.buffer[_HEADER.size:_HEADER.size + length])
                    del self.buffer[:_HEADER.size + length]
                    try:
                        return json.loads(data)
                    except ValueError as exc:
                        raise WorkerLost("error", "protocol_error", f"worker sent invalid JSON: {exc}") from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerLost("timeout", "timeout", "the plugin did not answer in time")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                try:
                    code = self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    code = None
                outcome, err, message = exit_outcome(code, self.sandboxed)
                self.violation(err, message) if outcome == "denied" else None
                raise WorkerLost(outcome, err, message)
            self.buffer.extend(chunk)

    def violation(self, code: str, message: str) -> None:
        """A refusal the worker reported (or the kernel enforced): kept for the call, and recorded by the
        web process's callback at once, where the plugin cannot reach it."""
        record = {"code": str(code)[:64], "message": str(message)[:300]}
        self.violations.append(record)
        if self.options.on_violation is not None:
            try:
                self.options.on_violation(self.label, record["code"], record["message"])
            except Exception:  # noqa: BLE001 - recording must never break the call
                logger.exception("could not record a plugin sandbox violation")

    def frame(self, deadline: float) -> dict[str, Any]:
        """The next frame that is not a violation report (those are recorded on the way)."""
        while True:
            frame = self.read(deadline)
            if frame.get("op") != "violation":
                return frame
            self.violation(frame.get("code") or "operation_not_allowed", frame.get("message") or "")

    def send(self, message: dict[str, Any]) -> None:
        try:
            write_frame(self.proc.stdin, message)
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise WorkerLost("error", "worker_crashed", f"the worker process is gone: {exc}") from None
        except ProtocolError as exc:
            raise WorkerLost("error", "request_too_large", str(exc)) from None

    def exchange(self, message: dict[str, Any], deadline: float, rpc: RpcHandler | None) -> dict[str, Any]:
        """Send a request, serve the worker's RPCs until it answers "done". RPC denials override the outcome."""
        self.send(message)
        denied: dict[str, str] | None = None
        first = len(self.violations)
        while True:
            frame = self.frame(deadline)
            op = frame.get("op")
            if op == "done":
                if isinstance(frame.get("cpu"), (int, float)):
                    self.cpu = float(frame["cpu"])
                if self.limits_reached():
                    frame = dict(frame, recycle=True)
                if len(self.violations) > first:
                    # A refusal marks the whole call, even if the plugin caught the error and carried on.
                    denied = self.violations[first]
                if denied is not None:
                    frame = {"op": "done", "outcome": "denied", "error": denied, "result": None, "patch": {},
                             "recycle": frame.get("recycle")}
                return frame
            if op != "rpc":
                raise WorkerLost("error", "protocol_error", f"unexpected frame {op!r}")
            try:
                if rpc is None:
                    raise RpcError("denied", "rpc_not_available", "no platform services during this call")
                value = rpc(str(frame.get("method")), dict(frame.get("args") or {}))
                reply = {"op": "rpc_result", "value": value}
            except RpcError as exc:
                if exc.outcome == "denied" and denied is None:
                    denied = {"code": exc.code, "message": exc.message}
                reply = {"op": "rpc_error", "outcome": exc.outcome, "code": exc.code, "message": exc.message}
            except Exception:  # noqa: BLE001 - a platform-side failure is the plugin's error, not a 500
                logger.exception("plugin rpc failed", extra={"method": frame.get("method")})
                reply = {"op": "rpc_error", "outcome": "error", "code": "platform_error",
                         "message": "the platform could not serve this request"}
            self.send(reply)

    # -- limits judged from outside ---------------------------------------------------------------
    # A plugin can catch MemoryError, an EFBIG OSError or a failed thread start and carry on, and it can
    # tamper with anything in its own process. After each call the web process therefore reads the
    # kernel's own figures for the worker (its /proc status and its scratch tmpfs), which nothing inside
    # the sandbox can lower or fake, and records a limit the worker ran into as a denial.

    def worker_pid(self) -> int | None:
        """The plugin interpreter's host pid: bubblewrap's monitor -> the namespace's pid 1 -> the worker."""
        if self._worker_pid is None:
            if not self.sandboxed:
                self._worker_pid = self.pid
            else:
                pid = self.pid
                for _ in range(2):
                    try:
                        with open(f"/proc/{pid}/task/{pid}/children") as fh:
                            children = fh.read().split()
                    except OSError:
                        return None
                    if len(children) != 1:
                        return None
                    pid = int(children[0])
                self._worker_pid = pid
        return self._worker_pid

    def limits_reached(self) -> bool:
        pid = self.worker_pid()
        if pid is None:
            return False
        try:
            if self._status_fd is None:
                self._status_fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
            status = os.pread(self._status_fd, 8192, 0)
        except OSError:
            return False
        found: list[tuple[str, str]] = []
        mb = 1024 * 1024
        cap = self.options.memory_limit_mb * mb
        peak = _status_field(status, b"VmPeak:", 10) * 1024
        if cap and peak > self.peak and peak >= cap - max(cap // 8, 16 * mb):
            found.append(("memory_limit", f"the worker's address space reached {peak // mb} MB of its "
                                          f"{self.options.memory_limit_mb} MB limit"))
        self.peak = max(self.peak, peak)
        pending = _status_field(status, b"ShdPnd:", 16) | _status_field(status, b"SigPnd:", 16)
        threads = _status_field(status, b"Threads:", 10) or 1
        if threads > 1:
            try:
                tasks = [t for t in os.listdir(f"/proc/{pid}/task") if t != str(pid)]
            except OSError:
                tasks = []
            for tid in tasks:
                try:
                    with open(f"/proc/{pid}/task/{tid}/status", "rb") as fh:
                        pending |= _status_field(fh.read(), b"SigPnd:", 16)
                except OSError:
                    pass
        if pending & (1 << (signal.SIGXFSZ - 1)):
            found.append(("file_size_limit", "the plugin wrote past the file-size limit with SIGXFSZ blocked"))
        if pending & (1 << (signal.SIGXCPU - 1)):
            found.append(("cpu_limit", "the worker reached its CPU-time limit with SIGXCPU blocked"))
        if self.sandboxed and self.options.max_processes and threads >= self.options.max_processes - 1:
            found.append(("process_limit", f"the worker reached its limit of {self.options.max_processes} "
                                           f"processes/threads ({threads})"))
        found += self._scratch_limits(f"/proc/{pid}/root{SCRATCH}" if self.sandboxed else self.tmp_dir)
        for code, message in found:
            self.violation(code, message)
        return bool(found)

    def _scratch_limits(self, root: str) -> list[tuple[str, str]]:
        """A file at the size cap (a write past it failed with EFBIG), or a full scratch tmpfs."""
        try:
            if self._scratch_fd is None:
                self._scratch_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            st = os.fstatvfs(self._scratch_fd)
        except OSError:
            return []
        found = []
        cap = self.options.file_size_mb * 1024 * 1024
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        if cap and used >= cap - st.f_frsize:
            stack, seen = [root], 0
            while stack and seen < 512:          # bounded: the web process never walks an unbounded tree
                try:
                    entries = list(os.scandir(stack.pop()))
                except OSError:
                    continue
                for entry in entries:
                    seen += 1
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_size >= cap:
                            found.append(("file_size_limit", f"a file in the scratch dir reached the "
                                                             f"{self.options.file_size_mb} MB file-size limit"))
                            return found
                    except OSError:
                        continue
        if self.sandboxed and st.f_blocks and st.f_bavail == 0:
            found.append(("scratch_full", f"the plugin filled its {self.options.scratch_mb} MB scratch dir"))
        return found

    def kill(self) -> None:
        if self.alive():
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.error("plugin worker did not die", extra={"pid": self.pid})
        self._cleanup()

    def close(self, timeout: float = 3.0, rpc: RpcHandler | None = None) -> None:
        """Graceful: the worker tears its plugin instance down, then exits; killed if it dawdles."""
        if self.alive():
            try:
                self.exchange({"op": "shutdown"}, time.monotonic() + timeout, rpc)
                self.proc.wait(timeout=timeout)
            except (WorkerLost, subprocess.TimeoutExpired):
                pass
        self.kill()

    def _cleanup(self) -> None:
        for fd in (self._status_fd, self._scratch_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._status_fd = self._scratch_fd = None
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


class PluginPool:
    """Warm workers for one plugin (one source/ref). Up to `size` calls run at once."""

    def __init__(self, name: str, source: str, ref: str, options: RuntimeOptions) -> None:
        self.name, self.source, self.ref, self.options = name, source, ref, options
        self.idle: list[WorkerProcess] = []
        self.count = 0
        self.closed = False
        self.cond = threading.Condition()
        self.spawned = 0

    def _spawn(self) -> WorkerProcess:
        worker = WorkerProcess({"mode": "plugin", "plugin": {"name": self.name, "source": self.source,
                                                             "ref": self.ref},
                                "extra_sys_path": unit_sys_path(self.source, self.ref, self.options)},
                               self.options, binds=unit_binds(self.source, self.ref, self.options),
                               trusted=self.source == "builtin", label=self.name)
        self.spawned += 1
        try:
            frame = worker.frame(time.monotonic() + self.options.start_timeout)
        except WorkerLost as exc:
            worker.kill()
            if exc.outcome == "timeout":
                raise WorkerLost("timeout", "worker_start_timeout",
                                 f"the plugin's worker did not start within {self.options.start_timeout}s") from None
            raise
        if frame.get("op") != "ready":
            worker.kill()
            error = frame.get("error") or {}
            raise WorkerLost("error", "plugin_load_failed", error.get("message") or "the plugin failed to load")
        if self.options.on_spawn:
            self.options.on_spawn(self.name)
        return worker

    def acquire(self, deadline: float) -> WorkerProcess:
        with self.cond:
            while True:
                if self.closed:
                    raise WorkerLost("error", "plugin_unloaded", "the plugin was unloaded")
                while self.idle:
                    worker = self.idle.pop()
                    if worker.alive():
                        return worker
                    self.count -= 1
                    worker.kill()
                if self.count < self.options.pool_size:
                    self.count += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkerLost("timeout", "pool_busy", "every worker of this plugin stayed busy")
                self.cond.wait(remaining)
        try:
            return self._spawn()
        except BaseException:
            with self.cond:
                self.count -= 1
                self.cond.notify()
            raise

    def release(self, worker: WorkerProcess, healthy: bool) -> None:
        with self.cond:
            # Retired before RLIMIT_CPU (a lifetime budget) could kill it in the middle of a call.
            fresh = worker.cpu < 0.8 * self.options.cpu_seconds if self.options.cpu_seconds else True
            keep = healthy and fresh and worker.alive() and not self.closed
            if keep:
                self.idle.append(worker)
            else:
                self.count -= 1
            self.cond.notify()
        if not keep:
            threading.Thread(target=worker.close if healthy else worker.kill, daemon=True).start()
            if not healthy:
                # Replace a killed or crashed worker now, so the next call does not pay a cold start.
                threading.Thread(target=self._replenish, daemon=True).start()

    def _replenish(self) -> None:
        with self.cond:
            if self.closed or self.idle or self.count >= self.options.pool_size:
                return
            self.count += 1
        try:
            worker = self._spawn()
        except Exception:  # noqa: BLE001 - the next call reports start-up failures itself
            with self.cond:
                self.count -= 1
                self.cond.notify()
            return
        with self.cond:
            if not self.closed:
                self.idle.append(worker)
                self.cond.notify()
                return
            self.count -= 1
        worker.kill()

    def call(self, spec: PluginSpec, message: dict[str, Any], timeout: float, rpc: RpcHandler | None) -> CallOutcome:
        started = time.monotonic()
        healthy = False
        worker: WorkerProcess | None = None
        try:
            # Start-up of a cold worker is bounded by start_timeout; the call's own clock starts when
            # a worker is ready, so a cold start does not eat the plugin's time budget.
            worker = self.acquire(started + max(timeout, self.options.start_timeout))
            deadline = time.monotonic() + timeout
            if worker.version != spec.version:
                reply = worker.exchange({"op": "setup", "config": spec.config, "scopes": list(spec.scopes),
                                         "allowed_hosts": list(spec.allowed_hosts), "version": spec.version},
                                        deadline, rpc)
                if reply.get("outcome") != "ok":
                    healthy = not reply.get("recycle")
                    error = reply.get("error") or {}
                    worker.version = None
                    return CallOutcome(reply.get("outcome", "error"), time.monotonic() - started,
                                       error_code=error.get("code", "setup_failed"),
                                       error_message="setup failed: " + error.get("message", ""))
                worker.version = spec.version
            reply = worker.exchange(message, deadline, rpc)
            healthy = not reply.get("recycle")
            error = reply.get("error") or {}
            outcome = reply.get("outcome") if reply.get("outcome") in OUTCOMES else "error"
            return CallOutcome(outcome, time.monotonic() - started, result=reply.get("result"),
                               patch=reply.get("patch") or {}, error_code=error.get("code"),
                               error_message=error.get("message", ""))
        except WorkerLost as exc:
            return CallOutcome(exc.outcome, time.monotonic() - started, error_code=exc.code, error_message=exc.message)
        finally:
            if worker is not None:
                self.release(worker, healthy)

    def reconfigure(self, spec: PluginSpec, timeout: float, rpc: RpcHandler | None) -> None:
        """Tear down the old instance and set up the new one in every idle worker now (busy ones catch up
        on their next call, which sees the new version)."""
        with self.cond:
            workers, self.idle = self.idle, []
        for worker in workers:
            ok = False
            try:
                reply = worker.exchange({"op": "setup", "config": spec.config, "scopes": list(spec.scopes),
                                         "allowed_hosts": list(spec.allowed_hosts), "version": spec.version},
                                        time.monotonic() + timeout, rpc)
                ok = reply.get("outcome") == "ok" and not reply.get("recycle")
                worker.version = spec.version if ok else None
            except WorkerLost:
                ok = False
            self.release(worker, ok)

    def close(self, rpc: RpcHandler | None = None) -> None:
        with self.cond:
            self.closed = True
            workers, self.idle = self.idle, []
            self.count -= len(workers)
            self.cond.notify_all()
        for worker in workers:
            worker.close(rpc=rpc)


def clean_description(unit: Unit, raw: Any) -> dict[str, Any]:
    """A worker's description of its plugin is data from plugin code: keep only well-formed fields, and
    take the name and location from the platform (the unit), never from the description."""
    from .base import INTENT_STAGE, SCOPES, STAGES

    if not isinstance(raw, dict):
        raise TypeError("not an object")
    schema = raw.get("config_schema")
    if not isinstance(schema, dict):
        raise ValueError("config_schema is not an object")
    scopes = raw.get("scopes") or []
    if not isinstance(scopes, list) or not all(s in SCOPES for s in scopes):
        raise ValueError(f"unknown scopes {scopes!r}")
    hooks = []
    for h in raw.get("hooks") or []:
        if not (isinstance(h, dict) and h.get("stage") in STAGES + (INTENT_STAGE,) and isinstance(h.get("method"), str)
                and h["method"].isidentifier() and not h["method"].startswith("_")):
            raise ValueError(f"malformed hook {h!r}"[:200])
        hooks.append({"stage": h["stage"], "method": h["method"], "priority": int(h.get("priority") or 0),
                      "intent": str(h["intent"]) if h.get("intent") else None,
                      "examples": [str(x) for x in h.get("examples") or []][:200],
                      "keywords": [str(x) for x in h.get("keywords") or []][:50],
                      "configurable": bool(h.get("configurable"))})
    if not hooks:
        raise ValueError("no hooks")
    return {"name": unit.name, "source": unit.source, "ref": unit.ref, "description": str(raw.get("description") or "")[:2000],
            "version": str(raw.get("version") or "")[:50], "config_schema": schema, "scopes": list(scopes),
            "hooks": hooks, "class": str(raw.get("class") or "")[:300]}


# Descriptions of locations whose code is known by content (a single-file module, the built-ins):
# the same bytes describe the same way, so rediscovery need not import them again in a fresh sandbox.
_described: dict[tuple, tuple[dict | None, list[dict[str, str]]]] = {}


def _cache_key(unit: Unit) -> tuple | None:
    import hashlib

    try:
        if unit.source == "dir" and os.path.isfile(unit.ref):
            with open(unit.ref, "rb") as fh:
                return (unit.source, unit.ref, unit.name, hashlib.sha256(fh.read()).hexdigest())
        if unit.source == "builtin":
            return (unit.source, unit.ref, unit.name,
                    tuple(os.stat(p).st_mtime_ns for p in _contract_files() if p.exists()))
    except OSError:
        return None
    return None


@dataclass
class Catalogue:
    plugins: dict[str, dict[str, Any]]
    errors: list[dict[str, str]]
    discovered_at: float


_runtimes: "weakref.WeakSet[PluginRuntime]" = weakref.WeakSet()
_generations = iter(range(1, 1 << 62))


class PluginRuntime:
    def __init__(self, options: RuntimeOptions) -> None:
        self.options = options
        self.pools: dict[str, PluginPool] = {}
        self.lock = threading.Lock()
        self.generation = next(_generations)
        _runtimes.add(self)

    def discover(self) -> Catalogue:
        """Find plugin locations here (no imports), then describe each in its own sandbox worker.

        Built-ins share one worker (platform code); every other location gets its own, so a module can
        describe only itself. A module whose import hangs past start_timeout or crashes is reported as a
        load error and never hides the others.
        """
        units, errors = candidates(plugins_dir=self.options.plugins_dir, dotted_paths=list(self.options.dotted_paths),
                                   entry_points=self.options.entry_points, builtins=self.options.builtins,
                                   extra_paths=list(self.options.sys_path))
        load_errors = [e.to_dict() for e in errors]
        plugins: dict[str, dict[str, Any]] = {}
        todo = []
        for unit in units:
            cached = _described.get(_cache_key(unit))
            if cached is None:
                todo.append(unit)
                continue
            if cached[0] is not None:
                plugins[unit.name] = dict(cached[0])
            load_errors += [dict(e) for e in cached[1]]
        groups = [[u for u in todo if u.source == "builtin"]] + [[u] for u in todo if u.source != "builtin"]
        groups = [g for g in groups if g]
        if groups:
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, len(groups))) as pool:
                for described, failed in pool.map(self._describe_group, groups):
                    plugins.update(described)
                    load_errors += failed
        order = {u.name: i for i, u in enumerate(units)}
        return Catalogue(dict(sorted(plugins.items(), key=lambda kv: order[kv[0]])), load_errors, time.time())

    def _describe_group(self, units: list[Unit]) -> tuple[dict[str, dict[str, Any]], list[dict[str, str]]]:
        described: dict[str, dict[str, Any]] = {}
        failed: list[dict[str, str]] = []
        pending = list(units)
        while pending:
            trusted = all(u.source == "builtin" for u in pending)
            binds = [b for u in pending for b in unit_binds(u.source, u.ref, self.options)]
            extra = [p for u in pending for p in unit_sys_path(u.source, u.ref, self.options)]
            try:
                worker = WorkerProcess({"mode": "describe", "units": [u.to_dict() for u in pending],
                                        "extra_sys_path": extra}, self.options, binds=binds, trusted=trusted,
                                       label=pending[0].name)
            except WorkerLost as exc:
                failed += [{"source": u.source, "ref": u.ref, "error": exc.message} for u in pending]
                break
            current: int | None = None
            try:
                while True:
                    # The trusted bootstrap (interpreter, sandbox, limits) is not the module's import: on a
                    # loaded machine it alone can take seconds, so only imports are held to start_timeout.
                    budget = self.options.start_timeout if current is not None else max(self.options.start_timeout, 30)
                    frame = worker.frame(time.monotonic() + budget)
                    if frame.get("op") == "importing":
                        current = 0 if current is None else current + 1
                        worker.label = pending[min(current, len(pending) - 1)].name
                        continue
                    break
            except WorkerLost as exc:
                if current is None:
                    failed += [{"source": u.source, "ref": u.ref, "error": f"plugin discovery failed: {exc.message}"}
                               for u in pending]
                    break
                unit = pending[min(current, len(pending) - 1)]
                if exc.outcome == "timeout":
                    error = f"import did not finish importing within {self.options.start_timeout}s"
                else:
                    error = f"import crashed the interpreter ({exc.message})"
                failed.append({"source": unit.source, "ref": unit.ref, "error": error})
                pending = pending[current + 1:]
                continue
            finally:
                worker.kill()
            results = frame.get("units") if frame.get("op") == "catalogue" else None
            if not isinstance(results, list) or len(results) != len(pending):
                failed += [{"source": u.source, "ref": u.ref, "error": "the discovery worker answered nonsense"}
                           for u in pending]
                break
            for unit, result in zip(pending, results):
                result = result if isinstance(result, dict) else {}
                errors = [{"source": unit.source, "ref": unit.ref, "error": str(error)[:1000]}
                          for error in (result.get("errors") or [])[:5]]
                meta = None
                if result.get("plugin") is not None:
                    try:
                        meta = described[unit.name] = clean_description(unit, result["plugin"])
                    except (TypeError, ValueError, KeyError) as exc:
                        errors.append({"source": unit.source, "ref": unit.ref,
                                       "error": f"invalid plugin description: {exc}"[:1000]})
                failed += errors
                key = _cache_key(unit)
                if key is not None:
                    _described[key] = (meta, errors)
            break
        return described, failed

    def pool(self, spec: PluginSpec) -> PluginPool:
        with self.lock:
            pool = self.pools.get(spec.name)
            if pool is not None and (pool.source, pool.ref) != (spec.source, spec.ref):
                self.pools.pop(spec.name)
                threading.Thread(target=pool.close, daemon=True).start()
                pool = None
            if pool is None:
                pool = self.pools[spec.name] = PluginPool(spec.name, spec.source, spec.ref, self.options)
            return pool

    def call(self, spec: PluginSpec, message: dict[str, Any], *, timeout: float,
             rpc: RpcHandler | None = None) -> CallOutcome:
        return self.pool(spec).call(spec, message, timeout, rpc)

    def apply(self, specs: dict[str, PluginSpec], *, timeout: float,
              rpc_for: Callable[[PluginSpec], RpcHandler | None]) -> None:
        """Bring running pools in line with the enabled plugins: retire the others, reconfigure changed ones."""
        with self.lock:
            retired = [self.pools.pop(name) for name in list(self.pools)
                       if name not in specs or (self.pools[name].source, self.pools[name].ref)
                       != (specs[name].source, specs[name].ref)]
            live = [(self.pools[name], specs[name]) for name in self.pools]
        for pool in retired:
            pool.close(rpc=rpc_for(PluginSpec(pool.name, pool.source, pool.ref, -1)))
        for pool, spec in live:
            if any(w.version != spec.version for w in list(pool.idle)):
                pool.reconfigure(spec, timeout, rpc_for(spec))

    def worker_pids(self) -> dict[str, list[int]]:
        with self.lock:
            return {name: [w.pid for w in pool.idle] for name, pool in self.pools.items()}

    def shutdown(self, rpc_for: Callable[[str], RpcHandler | None] | None = None) -> None:
        with self.lock:
            pools, self.pools = list(self.pools.values()), {}
        for pool in pools:
            pool.close(rpc=rpc_for(pool.name) if rpc_for else None)


@atexit.register
def _shutdown_all() -> None:
    for runtime in list(_runtimes):
        try:
            runtime.shutdown()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
