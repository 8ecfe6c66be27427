"""Fixtures for plugin tests: a PLUGINS_DIR with the misbehaving test plugins, a clean runtime per test."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SANDBOX_PLUGINS = Path(__file__).resolve().parent / "sandbox_plugins"


@pytest.fixture
def plugins_dir(tmp_path, settings):
    from apps.core import events
    from apps.plugins.services import runtime_reset

    target = tmp_path / "plugins"
    shutil.copytree(SANDBOX_PLUGINS, target, ignore=shutil.ignore_patterns("README.md", "__pycache__"))
    settings.PLUGINS_DIR = target
    settings.PLUGINS = []
    settings.PLUGIN_ENTRY_POINTS = False
    settings.PLUGIN_PYTHONPATH = []
    settings.PLUGIN_TIMEOUT_SECONDS = 3.0
    settings.PLUGIN_WORKERS_PER_PLUGIN = 1
    settings.PLUGIN_VERSION_CHECK_SECONDS = 0.0
    # The test services (order service, HR API) listen on loopback: "on premise" for the outbound gate.
    # Each plugin must still list the exact host:port in its own allowed_hosts.
    settings.OUTBOUND_ALLOWED_HOSTS = ["127.0.0.1"]
    # Each test's database starts again at version 0: forget versions a previous test applied.
    events._reset_for_tests()
    runtime_reset()
    yield target
    runtime_reset()


@pytest.fixture
def enable(django_capture_on_commit_callbacks):
    """enable(name, **service kwargs): enable a plugin through the service, running its on-commit events."""
    from apps.plugins.services import plugin_config_update

    def _enable(name: str, **kwargs):
        kwargs.setdefault("enabled", True)
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            row = plugin_config_update(name=name, **kwargs)
        row._callbacks = callbacks
        return row

    return _enable


@pytest.fixture
def make_turn():
    def _make(user, message: str, *, sources=None, history=None, conversation_id: int = 1):
        from apps.conversations.hooks import TurnContext

        return TurnContext(user=user, session_id="sess-1", conversation_id=conversation_id, message=message,
                           query=message, knowledge_bases=None, history=list(history or []),
                           sources=list(sources or []))

    return _make
