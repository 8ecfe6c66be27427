"""Admin (list, load errors, config editor, reload, stats), REST endpoints, metrics and the command."""
from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from apps.monitoring.metrics import REGISTRY
from apps.plugins.models import PluginConfig, PluginInvocation
from apps.plugins.selectors import invocation_stats, percentile
from apps.plugins.services import plugins_snapshot, plugins_turn_hook

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client, django_user_model):
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw-root-123")
    client.force_login(admin)
    return client


def test_changelist_shows_status_and_load_errors(plugins_dir, admin_client, enable):
    enable("recorder")
    page = admin_client.get("/admin/plugins/pluginconfig/").content.decode()
    assert "plugin-load-errors" in page and "this plugin module explodes at import" in page
    assert "recorder" in page and "enabled" in page and "order_query" in page and "Reload plugins" in page
    assert PluginConfig.objects.filter(name="order_query", enabled=False).exists()  # synced, disabled


def test_config_editor_shows_field_errors_and_saves_valid_config(plugins_dir, admin_client,
                                                                 django_capture_on_commit_callbacks):
    admin_client.get("/admin/plugins/pluginconfig/")
    row = PluginConfig.objects.get(name="recorder")
    url = f"/admin/plugins/pluginconfig/{row.pk}/change/"
    form = {"enabled": "on", "config": '{"greeting": "", "limit": 99}', "allowed_hosts": "", "timeout_seconds": "",
            "secret__token": ""}
    bad = admin_client.post(url, form)
    assert bad.status_code == 200
    body = bad.content.decode()
    assert "limit: 99 is greater than the maximum of 10" in body and "greeting:" in body
    assert not PluginConfig.objects.get(pk=row.pk).enabled
    not_json = admin_client.post(url, form | {"config": "{oops"})
    assert "Not valid JSON" in not_json.content.decode()

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        ok = admin_client.post(url, form | {"config": '{"greeting": "hey"}', "secret__token": "tkn-1234567890",
                                            "allowed_hosts": "api.example.com, *.corp.example.com:8443"})
    assert ok.status_code == 302, ok.content.decode()[:2000]
    assert len(callbacks) == 1  # plugin_config_updated goes out after commit
    row.refresh_from_db()
    assert row.enabled and row.config == {"greeting": "hey"} and row.version == 2
    assert row.allowed_hosts == ["*.corp.example.com:8443", "api.example.com"]
    view = plugins_snapshot().plugins["recorder"]
    assert view.status == "enabled" and view.secrets_set == ["token"] and view.config["token"] == "tkn-1234567890"
    assert "tkn-1234567890" not in admin_client.get(url).content.decode()


def test_reload_button_and_enable_action(plugins_dir, admin_client, django_capture_on_commit_callbacks):
    admin_client.get("/admin/plugins/pluginconfig/")
    (plugins_dir / "late.py").write_text(
        "from apps.plugins.base import BasePlugin, hook\n"
        "class Late(BasePlugin):\n    name = 'late'\n"
        "    @hook('after_answer')\n    def seen(self, ctx):\n        return None\n")
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post("/admin/plugins/pluginconfig/reload/")
    assert response.status_code == 302
    late = PluginConfig.objects.get(name="late")
    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post("/admin/plugins/pluginconfig/", {"action": "enable", "_selected_action": [late.pk]})
    assert plugins_snapshot().plugins["late"].status == "enabled"


def test_stats_success_rate_and_p95(plugins_dir, admin_client):
    rows = [PluginInvocation(plugin="order_query", stage="intent", outcome="ok", duration_ms=float(d))
            for d in range(1, 81)]
    rows += [PluginInvocation(plugin="order_query", stage="intent", outcome="error", duration_ms=float(d))
             for d in range(81, 96)]
    rows += [PluginInvocation(plugin="order_query", stage="intent", outcome="timeout", duration_ms=5000.0)
             for _ in range(5)]
    rows += [PluginInvocation(plugin="ticket_create", stage="intent", outcome="denied", duration_ms=0.0)]
    PluginInvocation.objects.bulk_create(rows)
    old = PluginInvocation.objects.create(plugin="order_query", stage="intent", outcome="error", duration_ms=1.0)
    PluginInvocation.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=30))

    stats = {s["plugin"]: s for s in invocation_stats(days=7)}
    order = stats["order_query"]
    assert (order["total"], order["ok"], order["error"], order["timeout"]) == (100, 80, 15, 5)
    assert order["success_rate"] == 0.8
    assert order["p95_ms"] == 95.0  # nearest rank: the 95th of 100 durations
    assert stats["ticket_create"]["p95_ms"] is None and stats["ticket_create"]["success_rate"] == 0.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([], 95) is None

    page = admin_client.get("/admin/plugins/pluginconfig/stats/?days=7").content.decode()
    assert "plugin-stats" in page and "order_query" in page and "80%" in page and "95.0" in page


def test_rest_endpoints_are_staff_only_and_validate(plugins_dir, api_client, user, staff_user, plugin_admin):
    for outsider in (user, staff_user):  # is_staff alone is no plugin administrator
        api_client.force_authenticate(outsider)
        denied = api_client.get("/api/v1/plugins/")
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "plugin_admin_only"
        assert api_client.patch("/api/v1/plugins/recorder/", {"enabled": True}, format="json").status_code == 403

    api_client.force_authenticate(plugin_admin)
    listing = api_client.get("/api/v1/plugins/").json()
    names = {p["name"]: p for p in listing["plugins"]}
    assert names["recorder"]["scopes"] == ["storage", "conversation:read"]
    assert any("broken_import.py" in e["ref"] for e in listing["load_errors"])

    bad = api_client.patch("/api/v1/plugins/recorder/", {"enabled": True, "config": {"limit": 0}}, format="json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_plugin_config"
    assert bad.json()["error"]["details"]["problems"] == [{"field": "limit", "message": "0 is less than the minimum of 1"}]
    groups = api_client.patch("/api/v1/plugins/recorder/", {"allowed_groups": ["nope"]}, format="json")
    assert groups.status_code == 400 and groups.json()["error"]["code"] == "unknown_groups"
    ok = api_client.patch("/api/v1/plugins/recorder/", {"enabled": True, "config": {"limit": 2},
                                                         "secrets": {"token": "zzz-secret-zzz"}}, format="json")
    assert ok.status_code == 200 and ok.json()["status"] == "enabled" and ok.json()["secrets_set"] == ["token"]
    assert "zzz-secret-zzz" not in json.dumps(api_client.get("/api/v1/plugins/").json())
    assert api_client.get("/api/v1/plugins/stats/?days=abc").json()["error"]["code"] == "invalid_days"
    assert api_client.get("/api/v1/plugins/stats/").status_code == 200
    assert api_client.patch("/api/v1/plugins/nope/", {"enabled": True}, format="json").json()["error"]["code"] == \
        "plugin_not_found"


def test_invocations_are_counted_in_prometheus(plugins_dir, enable, user, make_turn):
    def value(outcome):
        return REGISTRY.get_sample_value("kotaemon_plugin_invocations_total",
                                         {"plugin": "raiser", "outcome": outcome}) or 0.0

    def duration_count():
        return REGISTRY.get_sample_value("kotaemon_plugin_duration_seconds_count", {"plugin": "raiser"}) or 0.0

    before, before_count = value("error"), duration_count()
    enable("raiser")
    ctx = make_turn(user, "raise it")
    plugins_turn_hook("before_retrieval", ctx)
    assert value("error") == before + 1 and duration_count() == before_count + 1


def test_command_list_test_and_reload(plugins_dir, enable, user):
    out, err = io.StringIO(), io.StringIO()
    call_command("plugins", "list", stdout=out, stderr=err)
    assert "recorder" in out.getvalue() and "disabled" in out.getvalue()
    assert "LOAD ERROR dir" in err.getvalue() and "explodes at import" in err.getvalue()

    with pytest.raises(CommandError, match="plugin_not_enabled"):
        call_command("plugins", "test", "recorder", "record it", "--user", "alice", stdout=io.StringIO())
    enable("recorder")
    out = io.StringIO()
    call_command("plugins", "test", "recorder", "please record it", "--user", "alice", stdout=out)
    report = json.loads(out.getvalue())
    assert report["route"]["intent"] == "record_it" and report["invocation"]["outcome"] == "ok"
    assert report["invocation"]["result"]["content"] == "hello alice, call 1"
    with pytest.raises(CommandError, match="no such active user"):
        call_command("plugins", "test", "recorder", "record it", "--user", "nobody")
    enable("raiser")
    with pytest.raises(CommandError, match="plugin call failed: error plugin_exception"):
        call_command("plugins", "test", "raiser", "raise it", "--user", "alice", stdout=io.StringIO())
