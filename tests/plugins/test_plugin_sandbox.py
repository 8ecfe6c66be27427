"""Sandbox containment: raising, hanging, memory-hungry, snooping, wandering and spawning plugins are
contained; the turn still answers (without them) and every failure is recorded with its outcome."""
from __future__ import annotations

import os
import time

import pytest

from apps.plugins import services
from apps.plugins.models import PluginInvocation
from apps.plugins.services import plugins_turn_hook

pytestmark = pytest.mark.django_db


def _run(user, make_turn, message):
    ctx = make_turn(user, message)
    plugins_turn_hook("before_retrieval", ctx)
    return ctx


def _eventually(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _last(plugin):
    return PluginInvocation.objects.filter(plugin=plugin).latest("created_at")


def test_raising_plugin_is_recorded_as_error_and_turn_goes_on(plugins_dir, enable, user, make_turn):
    enable("raiser")
    ctx = _run(user, make_turn, "please raise it now")
    [result] = ctx.plugin_results
    assert result.ok is False and result.error_code == "plugin_exception"
    record = _last("raiser")
    assert record.outcome == "error" and "kaboom from a plugin" in record.error_message
    assert record.intent == "raise_it" and record.user_id == user.pk
    # The worker survived the exception: the next call reuses the same warm process.
    pids = services._state.runtime.worker_pids()
    assert len(pids["raiser"]) == 1
    _run(user, make_turn, "raise it again")
    assert services._state.runtime.worker_pids() == pids


def test_hanging_plugin_times_out_is_killed_and_replaced(plugins_dir, enable, user, make_turn):
    enable("sleeper", timeout_seconds=0.5)
    started = time.monotonic()
    ctx = _run(user, make_turn, "sleep it")
    elapsed = time.monotonic() - started
    assert ctx.plugin_results[0].ok is False and ctx.plugin_results[0].error_code == "timeout"
    assert elapsed < 5, elapsed  # 0.5 s budget + a cold worker start, far below the plugin's 120 s sleep
    record = _last("sleeper")
    assert record.outcome == "timeout" and 400 <= record.duration_ms < 5000
    # The hung process was killed and a warm replacement started at once; it serves (and times out) the next call.
    pool = services._state.runtime.pools["sleeper"]
    assert _eventually(lambda: pool.spawned == 2 and len(pool.idle) == 1)
    replacement = pool.idle[0].pid
    _run(user, make_turn, "sleep it")
    assert PluginInvocation.objects.filter(plugin="sleeper", outcome="timeout").count() == 2
    assert _eventually(lambda: pool.spawned == 3 and len(pool.idle) == 1 and pool.idle[0].pid != replacement)
    assert _eventually(lambda: not os.path.exists(f"/proc/{replacement}"))  # the hung worker was killed and reaped


@pytest.mark.parametrize("mode", ["one_shot", "gradual"])
def test_memory_hog_is_contained(plugins_dir, enable, user, make_turn, settings, mode):
    settings.PLUGIN_MEMORY_LIMIT_MB = 200
    enable("hog", config={"mode": mode}, timeout_seconds=10)
    ctx = _run(user, make_turn, "hog it")
    assert ctx.plugin_results[0].ok is False
    record = _last("hog")
    # One impossible allocation fails without moving the worker's peak: the MemoryError is the record. A
    # gradual hog drives the peak to the limit, which the web process reads itself (a denial).
    expected = ("error", "memory_limit_exceeded") if mode == "one_shot" else ("denied", "memory_limit")
    assert (record.outcome, record.error_code) == expected, record.error_message


def test_plugin_never_sees_platform_secrets(plugins_dir, enable, user, make_turn, settings):
    os.environ["KOTAEMON_TEST_CANARY"] = "canary-" + "s" * 20
    try:
        enable("snoop")
        ctx = _run(user, make_turn, "snoop it")
    finally:
        os.environ.pop("KOTAEMON_TEST_CANARY")
    [result] = ctx.plugin_results
    assert result.ok, result
    found = result.data
    assert found["env_secret"] is None
    assert "KOTAEMON_TEST_CANARY" not in found["env_keys"] and "DATABASE_URL" not in found["env_keys"]
    assert "DJANGO_SETTINGS_MODULE" not in found["env_keys"]
    assert found["django_loaded"] is False
    assert "settings_secret" not in found and found["settings_error"] in ("ImproperlyConfigured", "ModuleNotFoundError")
    assert settings.SECRET_KEY not in result.content


def test_reading_the_parent_environment_is_denied(plugins_dir, enable, user, make_turn):
    enable("parent_snoop")
    ctx = _run(user, make_turn, "parent snoop")
    assert ctx.plugin_results[0].ok is False
    record = _last("parent_snoop")
    assert record.outcome == "denied" and record.error_code == "operation_not_allowed"


def test_starting_processes_is_denied(plugins_dir, enable, user, make_turn):
    enable("spawner")
    _run(user, make_turn, "spawn it")
    record = _last("spawner")
    assert record.outcome == "denied" and "subprocess.Popen" in record.error_message


def test_http_client_refuses_hosts_outside_the_allow_list(plugins_dir, enable, user, make_turn):
    enable("wanderer", allowed_hosts=["127.0.0.1:9"], config={"target": "http://169.254.169.254/latest/meta-data"})
    ctx = _run(user, make_turn, "wander")
    assert ctx.plugin_results[0].ok is False
    record = _last("wanderer")
    assert record.outcome == "denied" and record.error_code == "host_not_allowed"
    assert "169.254.169.254" in record.error_message


def test_raw_sockets_to_other_hosts_are_denied_even_when_the_plugin_swallows_the_error(plugins_dir, enable, user,
                                                                                       make_turn):
    from tests.helpers import free_port

    enable("wanderer", allowed_hosts=["127.0.0.1:9"], config={"target": f"localhost:{free_port()}", "raw": True})
    ctx = _run(user, make_turn, "wander")
    assert ctx.plugin_results[0].ok is False
    assert _last("wanderer").outcome == "denied"


def test_disabled_plugin_and_no_match_leave_the_turn_untouched(plugins_dir, enable, user, make_turn):
    enable("raiser", enabled=False)
    ctx = _run(user, make_turn, "raise it")
    assert ctx.plugin_results == [] and not PluginInvocation.objects.exists()
    enable("raiser")
    ctx = _run(user, make_turn, "nothing to see here")
    assert ctx.plugin_results == [] and ctx.query == "nothing to see here"


@pytest.mark.parametrize("use", ["storage", "tickets", "http"])
def test_capabilities_without_their_scope_are_denied(plugins_dir, enable, user, make_turn, use):
    from apps.plugins.models import Ticket

    enable("overreacher", config={"use": use})
    ctx = _run(user, make_turn, "overreach")
    assert ctx.plugin_results[0].ok is False
    record = _last("overreacher")
    assert (record.outcome, record.error_code) == ("denied", "scope_missing"), record.error_message
    assert not Ticket.objects.exists()


def test_crashing_worker_is_recorded_and_replaced(plugins_dir, enable, user, make_turn):
    enable("crasher")
    for _ in range(2):
        ctx = _run(user, make_turn, "crash it")
        assert ctx.plugin_results[0].ok is False
    records = list(PluginInvocation.objects.filter(plugin="crasher").values_list("outcome", "error_code"))
    assert records == [("error", "worker_crashed")] * 2


def test_platform_data_is_unreadable_even_when_plugins_live_beside_it(plugins_dir, enable, user, make_turn,
                                                                      settings):
    # PLUGINS_DIR sits inside DATA_DIR here: plugin code still imports, the platform's files do not open.
    settings.DATA_DIR = plugins_dir.parent
    secret_file = plugins_dir.parent / "db-backup.sql"
    secret_file.write_text("password hashes")
    enable("reader", config={"path": str(secret_file)})
    ctx = _run(user, make_turn, "read it")
    assert ctx.plugin_results[0].ok is False
    record = _last("reader")
    assert (record.outcome, record.error_code) == ("denied", "operation_not_allowed")
    assert "(platform data)" in record.error_message
    enable("reader", config={"path": str(plugins_dir / "reader.py")})
    ctx = _run(user, make_turn, "read it")
    assert ctx.plugin_results[0].ok and "class Reader" in ctx.plugin_results[0].content
    # Only its own code is in its sandbox: the neighbouring plugin's module is not there at all.
    enable("reader", config={"path": str(plugins_dir / "recorder.py")})
    ctx = _run(user, make_turn, "read it")
    assert ctx.plugin_results[0].ok is False and _last("reader").outcome == "denied"
