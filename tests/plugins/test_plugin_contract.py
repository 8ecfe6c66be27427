"""The plugin contract: decorators, class validation, config schemas, host allow-lists, and discovery from
the plugins directory, dotted paths in settings and the `kotaemon_site.plugins` entry-point group."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from apps.plugins import schema
from apps.plugins.base import BasePlugin, hook, intent_hook
from apps.plugins.httpclient import host_allowed
from apps.plugins.services import plugins_snapshot, plugins_turn_hook
from tests.helpers import ROOT


def test_intent_hook_requires_a_valid_name_and_a_way_to_be_recognised():
    with pytest.raises(ValueError, match="needs examples or keywords"):
        intent_hook(intent="lonely")
    with pytest.raises(ValueError, match="intent must match"):
        intent_hook(intent="Bad Name", examples=["x"])
    with pytest.raises(ValueError, match="stage must be one of"):
        hook("before_everything")
    import re

    with pytest.raises(re.error):
        intent_hook(intent="ok_name", keywords=["(unclosed"])


def test_class_validation_reports_contract_violations():
    class NoName(BasePlugin):
        @intent_hook(intent="x_y", examples=["x"])
        def go(self, ctx):
            return None

    class BadScope(BasePlugin):
        name = "bad_scope"
        scopes = ("root",)

        @hook("after_answer")
        def go(self, ctx):
            return None

    class NoHooks(BasePlugin):
        name = "no_hooks"

    for cls, message in [(NoName, "name must match"), (BadScope, "unknown scopes"), (NoHooks, "declares no hooks")]:
        with pytest.raises(ValueError, match=message):
            cls.validate_class()


def test_schema_defaults_validation_and_secrets():
    s = {"type": "object", "properties": {
        "url": {"type": "string", "x-allow-host": True, "default": "https://api.example.com:8443/v1"},
        "n": {"type": "integer", "default": 3, "minimum": 1},
        "key": {"type": "string", "secret": True, "minLength": 12}},
        "required": ["url"], "additionalProperties": False}
    assert schema.defaults(s) == {"url": "https://api.example.com:8443/v1", "n": 3}
    assert schema.secret_fields(s) == ["key"]
    merged = schema.effective_config(s, {"n": 5}, {"key": "k" * 12})
    assert merged == {"url": "https://api.example.com:8443/v1", "n": 5, "key": "k" * 12}
    assert schema.hosts_from_config(s, merged) == ["api.example.com:8443"]
    problems = schema.validate(s, {"n": 0}, {"key": "short-secret"[:5]})
    assert problems == [{"field": "key", "message": "is invalid (fails 'minLength')"},
                        {"field": "n", "message": "0 is less than the minimum of 1"}]
    assert "short" not in repr(problems)  # a secret is never echoed back
    assert schema.validate(s, ["not", "a", "dict"]) == [{"field": "(config)", "message": "must be a JSON object"}]
    templated = schema.validate({"type": "object", "properties": {"u": {"type": "string", "x-allow-host": True}}},
                                {"u": "https://{slot.host}/x"})
    assert templated == [{"field": "u", "message": "the host part of this URL cannot contain placeholders"}]


@pytest.mark.parametrize("host,port,allowed,expected", [
    ("api.example.com", 443, ["api.example.com"], True),
    ("API.example.com", 443, ["api.example.com"], True),
    ("evil.com", 443, ["api.example.com"], False),
    ("api.example.com.evil.com", 443, ["api.example.com"], False),
    ("a.example.com", 443, ["*.example.com"], True),
    ("example.com", 443, ["*.example.com"], False),
    ("127.0.0.1", 8080, ["127.0.0.1:8080"], True),
    ("127.0.0.1", 8081, ["127.0.0.1:8080"], False),
    ("", 80, ["*"], False),
])
def test_host_allow_list(host, port, allowed, expected):
    assert host_allowed(host, port, allowed) is expected


def test_sandbox_modules_and_builtins_import_without_django():
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import apps.plugins.worker, apps.plugins.discovery, apps.plugins.httpclient
        import apps.plugins.builtin.order_query, apps.plugins.builtin.ticket_create, apps.plugins.builtin.http_api
        assert not [m for m in sys.modules if m.split(".")[0] == "django"], "django imported"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.django_db
def test_dotted_path_from_settings(plugins_dir, settings, tmp_path, enable, user, make_turn):
    settings.PLUGINS_DIR = tmp_path / "empty"
    settings.PLUGINS = ["tests.plugins.sandbox_plugins.recorder.Recorder", "no_such_module.Plugin"]
    snap = plugins_snapshot(need_catalogue=True)
    assert snap.plugins["recorder"].meta["source"] == "setting"
    assert snap.plugins["recorder"].meta["version"] == "2.1.0"
    assert [e["ref"] for e in snap.load_errors] == ["no_such_module.Plugin"]
    assert "ModuleNotFoundError" in snap.load_errors[0]["error"]
    enable("recorder")
    ctx = make_turn(user, "record it")
    plugins_turn_hook("before_retrieval", ctx)
    assert ctx.plugin_results[0].ok


@pytest.mark.django_db
def test_entry_point_plugins_are_discovered_and_run(plugins_dir, settings, tmp_path, enable, user, make_turn):
    site = tmp_path / "site"
    dist = site / "acme_kotaemon_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-kotaemon-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[kotaemon_site.plugins]\nacme = acme_plugin:AcmePlugin\n"
                                           "ghost = acme_missing_module:Ghost\n")
    (site / "acme_plugin.py").write_text(textwrap.dedent("""
        from apps.plugins.base import BasePlugin, intent_hook
        class AcmePlugin(BasePlugin):
            name = "acme"
            version = "1.0"
            @intent_hook(intent="acme_lookup", keywords=[r"\\bacme\\b"])
            def go(self, ctx):
                return "acme says hi to " + ctx.user.username
    """))
    settings.PLUGIN_ENTRY_POINTS = True
    settings.PLUGIN_PYTHONPATH = [str(site)]
    snap = plugins_snapshot(need_catalogue=True)
    assert snap.plugins["acme"].meta["source"] == "entry_point"
    ghost = [e for e in snap.load_errors if e["ref"] == "ghost"]
    assert ghost and ghost[0]["source"] == "entry_point" and "acme_missing_module" in ghost[0]["error"]
    enable("acme")
    ctx = make_turn(user, "ask acme")
    plugins_turn_hook("before_retrieval", ctx)
    assert ctx.plugin_results[0].content == "acme says hi to alice"
