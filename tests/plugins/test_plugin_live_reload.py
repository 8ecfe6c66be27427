"""Hot reload across processes: a running ASGI server picks up `manage.py plugins reload` (run in another
process) and config changes made elsewhere, without a restart, by its plugin config version check."""
from __future__ import annotations

import time

import httpx
import pytest
from django.core.management import call_command

from tests.helpers import asgi_server, server_env

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

MODULE = """
from apps.plugins.base import BasePlugin, intent_hook

class LateArrival(BasePlugin):
    name = "late_arrival"
    version = "0.1.0"
    config_schema = {"type": "object", "properties": {"word": {"type": "string", "default": "hi"}}}

    @intent_hook(intent="late_arrival", keywords=[r"\\blate arrival\\b"])
    def go(self, ctx):
        return ctx.config["word"]
"""


def _plugins(addr: str, headers: dict) -> dict:
    response = httpx.get(f"http://{addr}/api/v1/plugins/", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return {p["name"]: p for p in response.json()["plugins"]}


def _wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.3)


def test_running_server_applies_reload_and_config_changes(tmp_path, settings, plugin_admin):
    from apps.core import events
    from apps.core.services import api_key_create
    from apps.plugins.services import plugin_config_update, runtime_reset

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    settings.PLUGINS_DIR = plugins
    settings.PLUGIN_ENTRY_POINTS = False
    events._reset_for_tests()
    runtime_reset()
    headers = {"Authorization": f"Bearer {api_key_create(user=plugin_admin).raw_key}"}
    env = server_env(PLUGINS_DIR=str(plugins), PLUGIN_ENTRY_POINTS="0", PLUGIN_VERSION_CHECK_SECONDS="0.2",
                     CLUSTER_RUNTIME="0")
    try:
        with asgi_server(env) as (addr, _):
            assert "late_arrival" not in _plugins(addr, headers)

            (plugins / "late_arrival.py").write_text(MODULE)
            call_command("plugins", "reload")  # this process, not the server
            listed = _wait_for(lambda: _plugins(addr, headers).get("late_arrival"))
            assert listed and listed["status"] == "disabled" and listed["intents"] == ["late_arrival"]

            # Enabled through the server, reconfigured from this process (as another instance would).
            patched = httpx.patch(f"http://{addr}/api/v1/plugins/late_arrival/", json={"enabled": True},
                                  headers=headers, timeout=30)
            assert patched.status_code == 200 and patched.json()["status"] == "enabled", patched.text
            row = plugin_config_update(name="late_arrival", config={"word": "bonjour"})
            seen = _wait_for(lambda: _plugins(addr, headers)["late_arrival"]["config_version"] == row.version)
            assert seen
    finally:
        runtime_reset()
