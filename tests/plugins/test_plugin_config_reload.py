"""PluginConfig validation with clear errors, and hot reload: reconfigure, disable, add a module, reload."""
from __future__ import annotations

import pytest
from django.core.cache import cache
from django.core.management import call_command

from apps.core import events
from apps.core.errors import ApplicationError
from apps.plugins.models import PluginConfig, PluginRegistryState
from apps.plugins.services import (_cache_key, plugin_config_update, plugins_reload, plugins_snapshot,
                                   plugins_turn_hook, secrets_decrypt)

pytestmark = pytest.mark.django_db


def _problems(exc_info) -> dict[str, str]:
    assert exc_info.value.code == "invalid_plugin_config"
    return {p["field"]: p["message"] for p in exc_info.value.details["problems"]}


def _counter(name):
    return cache.get(_cache_key("recorder", "plugin", None, name)) or 0


def test_invalid_config_is_rejected_with_field_errors(plugins_dir):
    with pytest.raises(ApplicationError) as exc:
        plugin_config_update(name="recorder", enabled=True, config={"greeting": "", "limit": 99, "bogus": 1})
    problems = _problems(exc)
    assert set(problems) == {"greeting", "limit", "bogus"}
    assert "99 is greater than the maximum of 10" in problems["limit"]
    assert problems["bogus"] == "is not a setting of this plugin"
    assert "recorder" in exc.value.message and "limit" in exc.value.message
    assert not PluginConfig.objects.filter(name="recorder", enabled=True).exists()


def test_required_settings_block_enabling_but_not_saving_disabled(plugins_dir):
    plugin_config_update(name="order_query", enabled=False, config={"max_orders": 2})
    with pytest.raises(ApplicationError) as exc:
        plugin_config_update(name="order_query", enabled=True)
    assert _problems(exc) == {"base_url": "is required"}
    with pytest.raises(ApplicationError) as wrong_type:
        plugin_config_update(name="order_query", config={"base_url": "ftp://x", "max_orders": "three"})
    problems = _problems(wrong_type)
    assert "does not match" in problems["base_url"] and "is not of type 'integer'" in problems["max_orders"]


def test_secrets_are_write_only_encrypted_and_never_echoed(plugins_dir):
    with pytest.raises(ApplicationError) as in_config:
        plugin_config_update(name="recorder", config={"token": "s3cr3t-value"})
    assert _problems(in_config) == {"token": "is a secret; set it in the secret fields, not in the config"}
    assert "s3cr3t-value" not in str(in_config.value.details)
    row = plugin_config_update(name="recorder", secrets={"token": "s3cr3t-value"})
    assert "s3cr3t-value" not in row.secrets_encrypted and "s3cr3t-value" not in str(row.config)
    assert secrets_decrypt(row.secrets_encrypted) == {"token": "s3cr3t-value"}
    plugin_config_update(name="recorder", secrets={"token": ""})  # blank keeps the stored value
    assert secrets_decrypt(PluginConfig.objects.get(name="recorder").secrets_encrypted) == {"token": "s3cr3t-value"}
    with pytest.raises(ApplicationError) as unknown:
        plugin_config_update(name="recorder", secrets={"nope": "x"})
    assert _problems(unknown) == {"nope": "is not a secret field of this plugin"}
    plugin_config_update(name="recorder", clear_secrets=["token"])
    assert secrets_decrypt(PluginConfig.objects.get(name="recorder").secrets_encrypted) == {}


def test_other_bad_inputs_have_stable_codes(plugins_dir, user):
    with pytest.raises(ApplicationError) as missing:
        plugin_config_update(name="no_such_plugin", enabled=True)
    assert missing.value.code == "plugin_not_found" and missing.value.status_code == 404
    with pytest.raises(ApplicationError) as hosts:
        plugin_config_update(name="recorder", allowed_hosts=["ok.example.com", "bad host/", "*.x.org:8080"])
    assert hosts.value.code == "invalid_allowed_hosts" and hosts.value.details == {"invalid": ["bad host/"]}
    with pytest.raises(ApplicationError) as timeout:
        plugin_config_update(name="recorder", timeout_seconds=600)
    assert timeout.value.code == "invalid_timeout"
    with pytest.raises(ApplicationError) as not_staff:
        plugin_config_update(name="recorder", enabled=True, actor=user)
    assert not_staff.value.code == "plugin_admin_only" and not_staff.value.status_code == 403


def test_reconfigure_and_disable_take_effect_without_restart(plugins_dir, enable, user, make_turn):
    enable("recorder", config={"greeting": "hello"})
    ctx = make_turn(user, "record it")
    plugins_turn_hook("before_retrieval", ctx)
    assert ctx.plugin_results[0].content == "hello alice, call 1"
    assert (_counter("setups"), _counter("teardowns")) == (1, 0)

    row = enable("recorder", config={"greeting": "bonjour"})
    # The event ran after commit: the warm worker tore the old instance down and set up the new one.
    assert len(row._callbacks) == 1
    assert (_counter("setups"), _counter("teardowns")) == (2, 1)
    assert cache.get(_cache_key("recorder", "plugin", None, "last_greeting")) == "bonjour"
    ctx = make_turn(user, "record it")
    plugins_turn_hook("before_retrieval", ctx)
    assert ctx.plugin_results[0].content == "bonjour alice, call 2"

    enable("recorder", enabled=False)
    assert _counter("teardowns") == 2  # disabled: its workers were shut down gracefully
    ctx = make_turn(user, "record it")
    plugins_turn_hook("before_retrieval", ctx)
    assert ctx.plugin_results == []


def test_change_is_broadcast_as_plugin_config_updated(plugins_dir, enable):
    row = enable("recorder")
    state = PluginRegistryState.objects.get(pk=1)
    assert row.version == 1 and state.version >= 1
    # The version is the cluster-wide plugin config version; this process now holds it.
    assert max(events.held_versions("plugin_config_updated").values()) == state.version
    last = events.last_event()
    assert last["type"] == "plugin_config_updated" and last["version"] == state.version


def test_instance_that_missed_the_event_heals_from_the_database(plugins_dir, enable, user, make_turn, settings):
    enable("recorder", config={"greeting": "hello"})
    assert plugins_snapshot().plugins["recorder"].config["greeting"] == "hello"
    # Another instance changed the config; this process never hears the event (callbacks not run).
    plugin_config_update(name="recorder", config={"greeting": "healed"})
    settings.PLUGIN_VERSION_CHECK_SECONDS = 0.0
    ctx = make_turn(user, "record it")
    plugins_turn_hook("before_retrieval", ctx)
    assert ctx.plugin_results[0].content.startswith("healed ")


def test_new_module_is_picked_up_by_reload_and_broken_modules_are_reported(plugins_dir, enable, user, make_turn,
                                                                             django_capture_on_commit_callbacks):
    snap = plugins_snapshot(need_catalogue=True)
    assert "newcomer" not in snap.plugins
    errors = {e["ref"].rsplit("/", 1)[-1]: e["error"] for e in snap.load_errors}
    assert "RuntimeError: this plugin module explodes at import" in errors["broken_import.py"]
    assert "no plugin class found" in errors["not_a_plugin.py"]
    assert {"recorder", "raiser", "order_query", "ticket_create", "http_api"} <= set(snap.plugins)

    (plugins_dir / "newcomer.py").write_text(
        "from apps.plugins.base import BasePlugin, intent_hook\n"
        "class Newcomer(BasePlugin):\n"
        "    name = 'newcomer'\n"
        "    @intent_hook(intent='greet_newcomer', keywords=[r'\\bnewcomer\\b'])\n"
        "    def go(self, ctx):\n"
        "        return 'welcome from a module added at run time'\n")
    with django_capture_on_commit_callbacks(execute=True):
        call_command("plugins", "reload")
    snap = plugins_snapshot()
    assert snap.plugins["newcomer"].status == "disabled"  # discovered, created disabled
    enable("newcomer")
    ctx = make_turn(user, "hello newcomer")
    plugins_turn_hook("before_retrieval", ctx)
    assert ctx.plugin_results[0].content == "welcome from a module added at run time"


def test_reload_tears_down_running_plugins(plugins_dir, enable, user, make_turn, django_capture_on_commit_callbacks):
    enable("recorder")
    ctx = make_turn(user, "record it")
    plugins_turn_hook("before_retrieval", ctx)
    assert (_counter("setups"), _counter("teardowns")) == (1, 0)
    with django_capture_on_commit_callbacks(execute=True):
        plugins_reload()
    assert _counter("teardowns") == 1
    ctx = make_turn(user, "record it")
    plugins_turn_hook("before_retrieval", ctx)
    assert ctx.plugin_results[0].ok and _counter("setups") == 2


def test_hanging_import_is_reported_without_hiding_other_plugins(plugins_dir, settings):
    settings.PLUGIN_START_TIMEOUT_SECONDS = 1.0
    (plugins_dir / "slow_import.py").write_text("import time\ntime.sleep(60)\n")
    snap = plugins_snapshot(need_catalogue=True)
    errors = {e["ref"].rsplit("/", 1)[-1]: e["error"] for e in snap.load_errors}
    assert "did not finish importing within 1.0s" in errors["slow_import.py"]
    assert "recorder" in snap.plugins and "order_query" in snap.plugins
