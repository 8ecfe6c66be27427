"""Red team: hostile plugins, each a real module in PLUGINS_DIR, run through the real runner (bubblewrap,
seccomp, rlimits, audit hook). Every attempt must fail AND be recorded where the plugin cannot reach:
the PluginInvocation row and the kotaemon_plugin_sandbox_violations_total counter of the web process.
The hostile modules swallow their errors and store what they got as "loot" (storage is served by the
platform, so the loot survives even when the call is denied)."""
from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import threading
from pathlib import Path

import pytest
from django.core.cache import cache

from apps.monitoring.metrics import REGISTRY
from apps.plugins.models import PluginInvocation
from apps.plugins.services import _cache_key, plugin_invoke, plugins_snapshot, runtime_reset

pytestmark = [pytest.mark.django_db, pytest.mark.slow]

HOSTILE = Path(__file__).resolve().parent / "hostile"
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def redteam(plugins_dir, settings):
    """plugins_dir's settings, with the hostile modules as the plugins directory."""
    target = plugins_dir.parent / "hostile_plugins"
    shutil.copytree(HOSTILE, target, ignore=shutil.ignore_patterns("README.md", "__pycache__"))
    settings.PLUGINS_DIR = target
    settings.DATA_DIR = plugins_dir.parent / "data"
    settings.DATA_DIR.mkdir()
    settings.PLUGIN_TIMEOUT_SECONDS = 10.0
    runtime_reset()
    return target


def violations(plugin: str, code: str | None = None) -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name != "kotaemon_plugin_sandbox_violations":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("plugin") == plugin \
                    and (code is None or sample.labels.get("code") == code):
                total += sample.value
    return total


def attack(user, name: str, intent: str, *, timeout: float | None = None):
    view = plugins_snapshot().plugins[name]
    assert view.meta is not None, plugins_snapshot().load_errors
    method = view.hooks("intent")[0]["method"]
    outcome = plugin_invoke(view=view, stage="intent", method=method, user=user, intent=intent,
                            ctx={"message": intent, "query": intent, "sources": [], "history": []})
    record = PluginInvocation.objects.filter(plugin=name).latest("created_at")
    assert (record.outcome, record.error_code) == (outcome.outcome, outcome.error_code or "")
    return outcome


def host_uid(name: str) -> int:
    from apps.plugins.services import _runtime

    (worker,) = _runtime().pools[name].idle
    with open(f"/proc/{worker.worker_pid()}/status") as fh:
        return int(next(line for line in fh if line.startswith("Uid:")).split()[1])


def loot(name: str):
    return cache.get(_cache_key(name, "plugin", None, "loot"))


def test_what_a_plugin_sees_from_inside(redteam, enable, user, settings):
    own = redteam / "introspect.py"
    paths = [str(own), str(redteam / "victim.py"), str(ROOT / "kotaemon_site" / "settings.py"), str(ROOT / ".env"),
             str(settings.DATA_DIR), str(settings.MEDIA_ROOT), "/etc/passwd", "/root/.ssh", "/root/.bashrc", "/work/main/var", "/usr/bin/sh"]
    enable("introspect", config={"paths": paths})
    outcome = attack(user, "introspect", "introspect it")
    assert outcome.outcome == "ok", outcome
    inside = outcome.result["data"]
    assert (inside["uid"], inside["gid"], inside["pid"], inside["hostname"]) == (65534, 65534, 2, "plugin")
    assert inside["processes"] == ["1", "2"]     # its own pid namespace: bubblewrap's reaper and itself, nothing else
    assert inside["interfaces"] == ["lo"]        # its own network namespace: nothing but loopback
    assert inside["seen"] == {p: p == str(own) for p in paths}, inside["seen"]
    assert inside["cwd"] == "/scratch"
    # Read-only everywhere but the scratch dir, /proc included (no writes to /proc/self/mem, clear_refs...);
    # the scratch dir belongs to the worker's uid alone.
    assert inside["mount_options"]["/"].startswith("ro") and inside["mount_options"]["/proc"].startswith("ro")
    assert inside["mount_options"]["/scratch"].startswith("rw") and inside["scratch"] == [65534, "0o700"]
    assert inside["groups"] in ([], [65534])
    # On the host, the interpreter runs as the unprivileged sandbox uid when the platform is root (so the
    # kernel applies RLIMIT_NPROC), and as the platform's own non-root user otherwise.
    uid = host_uid("introspect")
    assert uid == (65534 if os.geteuid() == 0 else os.geteuid()) and uid != 0
    assert set(inside["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "PYTHONIOENCODING", "OMP_NUM_THREADS",
                                  "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONDONTWRITEBYTECODE", "PWD"}


def test_parent_environment(redteam, enable, user, monkeypatch):
    canary = "canary-" + "k" * 24
    monkeypatch.setenv("KOTAEMON_REDTEAM_CANARY", canary)
    runtime_reset()
    enable("env_thief")
    before = violations("env_thief")
    outcome = attack(user, "env_thief", "attack env")
    got = loot("env_thief")
    assert canary not in repr(got) and "SECRET_KEY" not in got["environ"] and "DATABASE_URL" not in got["environ"]
    # Its parent is the sandbox's reaper; only its own /proc entry opened, every other one was refused.
    assert got["ppid"] == 1 and set(got["files"]) <= {"/proc/2/environ"}
    assert (outcome.outcome, outcome.error_code) == ("denied", "operation_not_allowed")
    assert violations("env_thief") > before


def test_database_file_and_sqlite(redteam, enable, user, settings):
    db = settings.DATA_DIR / "db.sqlite3"
    con = sqlite3.connect(db)
    con.execute("create table auth_user (username text, password text)")
    con.execute("insert into auth_user values ('admin', 'pbkdf2_sha256$secret')")
    con.commit()
    con.close()
    enable("db_thief", config={"path": str(db)})
    before = violations("db_thief")
    outcome = attack(user, "db_thief", "attack db")
    got = loot("db_thief")
    assert got["raw"] is None and got["rows"] is None, got
    assert (outcome.outcome, outcome.error_code) == ("denied", "operation_not_allowed")
    assert violations("db_thief") >= before + 2  # the open() and sqlite3.connect, each recorded


def test_sockets_to_redis_postgres_and_the_web_port(redteam, enable, user):
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    listener.settimeout(0.2)

    def serve():
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass

    stop = threading.Event()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        enable("socket_thief", config={"ports": [6379, 5432, listener.getsockname()[1]]})
        before = violations("socket_thief", "host_not_allowed")
        outcome = attack(user, "socket_thief", "attack socket")
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert loot("socket_thief")["connected"] == [] and accepted == []
    assert (outcome.outcome, outcome.error_code) == ("denied", "host_not_allowed")
    assert violations("socket_thief", "host_not_allowed") >= before + 6


def test_starting_processes(redteam, enable, user):
    enable("spawner")
    before = violations("spawner")
    outcome = attack(user, "spawner", "attack spawn")
    assert loot("spawner")["outputs"] == []
    assert (outcome.outcome, outcome.error_code) == ("denied", "operation_not_allowed")
    assert violations("spawner") >= before + 3


def test_ctypes_to_call_libc_directly(redteam, enable, user):
    enable("ctypes_bypass")
    before = violations("ctypes_bypass")
    outcome = attack(user, "ctypes_bypass", "attack ctypes")
    got = loot("ctypes_bypass")
    assert got["getuid"] is None and got["socket_fd"] is None and "handle" not in got
    assert (outcome.outcome, outcome.error_code) == ("denied", "operation_not_allowed")
    assert violations("ctypes_bypass") >= before + 2


def test_fork_bomb_through_os_fork(redteam, enable, user):
    enable("fork_bomb")
    before = violations("fork_bomb")
    outcome = attack(user, "fork_bomb", "attack fork")
    assert loot("fork_bomb")["children"] == 0
    assert (outcome.outcome, outcome.error_code) == ("denied", "operation_not_allowed")
    assert violations("fork_bomb") > before


def test_fork_without_any_audit_event_is_killed_by_the_kernel(redteam, enable, user):
    """_posixsubprocess.fork_exec raises no audit event: only seccomp stands in the way, and the
    web process records the kill (SIGSYS) itself."""
    enable("fork_bomb", config={"bypass": True})
    before = violations("fork_bomb", "sandbox_violation")
    outcome = attack(user, "fork_bomb", "attack fork")
    assert loot("fork_bomb") == {"children": "about to bypass"}  # it never got a pid back
    assert (outcome.outcome, outcome.error_code) == ("denied", "sandbox_violation"), outcome
    assert violations("fork_bomb", "sandbox_violation") == before + 1


@pytest.mark.parametrize("catch", [False, True])
def test_memory_bomb_is_recorded_even_when_it_catches_memory_error(redteam, enable, user, settings, catch):
    """The web process reads the worker's peak address space (the kernel's VmPeak) after every call: a
    plugin that swallows its MemoryError cannot hide that it ran into the limit."""
    settings.PLUGIN_MEMORY_LIMIT_MB = 256
    enable("memory_bomb", config={"catch": catch})
    before = violations("memory_bomb", "memory_limit")
    outcome = attack(user, "memory_bomb", "attack memory")
    assert (outcome.outcome, outcome.error_code) == ("denied", "memory_limit"), outcome
    assert violations("memory_bomb", "memory_limit") == before + 1
    if catch:
        assert 0 < loot("memory_bomb")["allocated_mb"] < 256   # it got its MemoryError, and swallowed it
    # The worker that ran into the limit is not kept: the next call starts from a fresh address space.
    from apps.plugins.services import _runtime

    assert all(w.peak == 0 for w in _runtime().pools["memory_bomb"].idle)


def test_well_behaved_calls_record_no_limit(redteam, enable, user):
    enable("victim")
    for _ in range(3):
        assert attack(user, "victim", "victim it").outcome == "ok"
    assert violations("victim") == 0


@pytest.mark.parametrize("delete", [False, True])
def test_file_size_limit_with_sigxfsz_blocked_is_recorded(redteam, enable, user, settings, delete):
    """EFBIG caught, the file even deleted: the blocked SIGXFSZ stays pending on the worker, where the web
    process sees it (and, without `delete`, the file at the cap in the scratch tmpfs)."""
    settings.PLUGIN_MAX_FILE_MB = 8
    enable("efbig", config={"mode": "block", "delete": delete})
    before = violations("efbig", "file_size_limit")
    outcome = attack(user, "efbig", "attack efbig")
    got = loot("efbig")
    assert got["written"] == 8 * 1024 * 1024 and "File too large" in got["error"], got
    assert (outcome.outcome, outcome.error_code) == ("denied", "file_size_limit"), outcome
    assert violations("efbig", "file_size_limit") >= before + 1


def test_ignoring_sigxfsz_again_kills_the_worker(redteam, enable, user, settings):
    """signal.signal(SIGXFSZ, SIG_IGN) would turn the file-size limit into an ignorable error: seccomp
    kills the worker at the attempt, before any write."""
    settings.PLUGIN_MAX_FILE_MB = 8
    enable("efbig", config={"mode": "ignore"})
    before = violations("efbig", "sandbox_violation")
    outcome = attack(user, "efbig", "attack efbig")
    assert loot("efbig") == {"step": "about to ignore"}
    assert (outcome.outcome, outcome.error_code) == ("denied", "sandbox_violation"), outcome
    assert violations("efbig", "sandbox_violation") == before + 1


def test_thread_bomb_is_stopped_by_rlimit_nproc_and_recorded(redteam, enable, user, settings):
    """Even when the platform runs as root: the worker runs as an unprivileged host uid, so the kernel
    applies RLIMIT_NPROC to it (root is exempt), and the web process records the limit."""
    settings.PLUGIN_MAX_PROCESSES = 16
    enable("thread_bomb", config={"threads": 200})
    before = violations("thread_bomb", "process_limit")
    outcome = attack(user, "thread_bomb", "attack threads")
    got = loot("thread_bomb")
    assert got["started"] < 16 and "can't start new thread" in got["error"], got
    # (Each thread's malloc arena also reserves address space, so memory_limit may be recorded as well.)
    assert outcome.outcome == "denied" and outcome.error_code in ("process_limit", "memory_limit"), outcome
    assert violations("thread_bomb", "process_limit") == before + 1


def test_writes_outside_the_scratch_dir(redteam, enable, user, settings):
    victim = redteam / "victim.py"
    original = victim.read_text()
    targets = [str(victim), str(ROOT / "owned.txt"), str(settings.DATA_DIR / "owned"), str(redteam / "new.py")]
    enable("writer", config={"targets": targets})
    before = violations("writer")
    outcome = attack(user, "writer", "attack write")
    assert loot("writer")["written"] == []
    assert victim.read_text() == original and not any(Path(t).exists() for t in targets[1:])
    assert (outcome.outcome, outcome.error_code) == ("denied", "operation_not_allowed")
    assert violations("writer") >= before + 2 * len(targets)


def test_writes_to_its_own_proc_entries(redteam, enable, user):
    """clear_refs would reset the figures the web process judges limits by, /proc/self/mem would patch the
    interpreter without ctypes: the hook refuses each open, and /proc is mounted read-only beneath it."""
    enable("proc_writer")
    before = violations("proc_writer", "operation_not_allowed")
    outcome = attack(user, "proc_writer", "attack proc")
    assert loot("proc_writer")["written"] == []
    assert (outcome.outcome, outcome.error_code) == ("denied", "operation_not_allowed")
    assert violations("proc_writer", "operation_not_allowed") >= before + 8


def test_huge_file_in_the_scratch_dir(redteam, enable, user, settings):
    settings.PLUGIN_MAX_FILE_MB = 8
    enable("huge_file")
    outcome = attack(user, "huge_file", "attack huge")
    assert (outcome.outcome, outcome.error_code) == ("error", "file_size_limit_exceeded"), outcome
    assert loot("huge_file") is None   # killed mid-write: it never got to report success


@pytest.mark.parametrize("mode", ["gc", "globals", "frames"])
def test_tampering_with_its_own_sandbox_objects(redteam, enable, user, mode):
    enable("tamper", config={"mode": mode})
    before = violations("tamper")
    outcome = attack(user, "tamper", "attack tamper")
    got = loot("tamper")
    done = dict(got["steps"])
    assert "subprocess" not in done and "write outside" not in done, got
    if mode == "gc":
        assert "gc.get_objects" not in done and "gc.get_referrers" not in done
    if mode == "frames":
        assert got["frames"] == [] and "settrace" not in done  # no guard state on any frame to flip
    assert outcome.outcome == "denied" and violations("tamper") >= before + 2


def test_swapping_the_protocol_pipe_to_hide_refusals_kills_the_worker(redteam, enable, user):
    enable("tamper", config={"mode": "pipe"})
    before = violations("tamper", "sandbox_tampered")
    outcome = attack(user, "tamper", "attack tamper")
    assert (outcome.outcome, outcome.error_code) == ("denied", "sandbox_tampered"), outcome
    assert violations("tamper", "sandbox_tampered") == before + 1


def test_claiming_another_plugins_name_gets_neither_name_nor_secrets(redteam, enable, user):
    snap = plugins_snapshot(need_catalogue=True)
    assert snap.plugins["victim"].meta["ref"].endswith("/victim.py")
    assert snap.plugins["order_query"].meta["source"] == "builtin"
    assert "aaa_name_thief" not in snap.plugins
    errors = {Path(e["ref"]).name: e["error"] for e in snap.load_errors}
    assert "['order_query', 'victim']" in errors["aaa_name_thief.py"]
    enable("victim", secrets={"token": "victim-token-123"})
    outcome = attack(user, "victim", "victim it")
    assert outcome.result["content"] == "the real victim answered" and outcome.result["data"] == {"token_set": True}
    assert cache.get(_cache_key("victim", "plugin", None, "setup_by")) == "victim.py"
    assert cache.get(_cache_key("victim", "plugin", None, "stolen")) is None


def test_forged_discovery_frames_name_nobody_else(redteam, enable, user):
    snap = plugins_snapshot(need_catalogue=True)
    assert snap.plugins["victim"].meta["ref"].endswith("/victim.py")
    assert all(p.meta is None or not p.meta["ref"].startswith("/tmp/forged") for p in snap.plugins.values())
    forger = snap.plugins.get("forger")
    # Whatever it forged, it describes at most itself, under the name of its own file.
    assert forger is None or forger.meta is None or forger.meta["ref"].endswith("/forger.py")


def test_without_bubblewrap_untrusted_plugins_are_refused_with_a_clear_error(redteam, enable, user, monkeypatch,
                                                                             settings):
    monkeypatch.setenv("PATH", "/nonexistent")
    runtime_reset()
    snap = plugins_snapshot(need_catalogue=True)
    errors = {Path(e["ref"]).name: e["error"] for e in snap.load_errors}
    assert "bubblewrap (bwrap) is not installed" in errors["victim.py"] and "PLUGIN_SANDBOX=none" in errors["victim.py"]
    assert "victim" not in snap.plugins or snap.plugins["victim"].meta is None
    # Built-in plugins are platform code: they still run (without OS isolation, which is logged).
    enable("ticket_create")
    view = plugins_snapshot().plugins["ticket_create"]
    done = plugin_invoke(view=view, stage="intent", method="hand_off", user=user, intent="human_handoff",
                         ctx={"message": "a human please", "query": "a human please"},
                         turn={"conversation_id": None, "session_id": "", "transcript": []})
    assert done.outcome == "ok", done
    # Only an explicit setting runs untrusted code without the sandbox.
    settings.PLUGIN_SANDBOX = "none"
    runtime_reset()
    enable("victim")
    assert attack(user, "victim", "victim it").result["content"] == "the real victim answered"


def test_after_retrieval_sees_chunk_text_only_with_a_granted_knowledge_scope(redteam, enable, user, make_turn):
    """Finding 9: private chunk text reaches a plugin only when it declares knowledge:read AND an
    administrator granted it; otherwise the hook gets metadata only."""
    from apps.plugins.services import plugins_turn_hook

    sources = [{"chunk_id": 7, "document_id": 3, "document_title": "Salaries 2026", "text": "CEO earns 9M",
                "score": 0.9}]

    def seen(name):
        plugins_turn_hook("after_retrieval", make_turn(user, "what do people earn", sources=sources))
        return loot(name)

    enable("chunk_reader")
    assert plugins_snapshot().plugins["chunk_reader"].scopes == ("storage",)
    assert seen("chunk_reader") == [{"title": "Salaries 2026", "text": ""}]
    enable("chunk_reader", granted_scopes=["knowledge:read"])
    assert seen("chunk_reader") == [{"title": "Salaries 2026", "text": "CEO earns 9M"}]
    enable("chunk_reader", enabled=False)
    enable("chunk_peeker", granted_scopes=["knowledge:read"])   # granted, but never declared
    assert seen("chunk_peeker") == [{"title": "Salaries 2026", "text": ""}]
    from apps.core.errors import ApplicationError

    with pytest.raises(ApplicationError) as err:
        enable("chunk_peeker", granted_scopes=["root"])
    assert err.value.code == "invalid_granted_scopes"
