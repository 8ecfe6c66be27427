"""Shared fixtures. Redis-backed behaviour runs against a real Redis: if none can be reached the
test fails (it never skips), because CI must prove the production code paths."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/15"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {url} is required for this test and could not be reached: {exc}")
    return url


@pytest.fixture(autouse=True)
def _default_language():
    """A request served in Chinese leaves its language active in the thread (LocaleMiddleware activates,
    nothing deactivates): each test starts from the default, English."""
    from django.utils import translation

    translation.deactivate()
    yield
    translation.deactivate()


@pytest.fixture(autouse=True)
def _fresh_cache():
    from tests.helpers import clear_cache

    clear_cache()
    yield


@pytest.fixture(autouse=True)
def _isolated_process_state(settings, tmp_path):
    """Ids are reused across tests (rolled-back transactions), so per-process state keyed by them (event
    versions seen, loaded index versions) must not leak from one test into the next; each test also gets
    its own index and media folders."""
    from apps.core import events
    from apps.knowledge.index_registry import registry

    settings.INDEX_ROOT = tmp_path / "indexes"
    settings.MEDIA_ROOT = tmp_path / "media"
    # In-process tests see their own activations at once: a search waits for the newer version's background
    # load (servers never do; tests/knowledge/test_kb_index_maintenance.py checks that path with 0).
    settings.KNOWLEDGE_SWAP_WAIT_SECONDS = 30
    registry.clear()
    events._reset_for_tests()
    yield
    registry.clear()


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user(username="alice", password="pw-alice-123", email="alice@example.com")


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user(username="bob", password="pw-bob-123", email="bob@example.com")


@pytest.fixture
def staff_user(django_user_model):
    return django_user_model.objects.create_user(username="editor", password="pw-editor-123", is_staff=True)


def _in_role(user, role: str):
    from django.contrib.auth.models import Group

    user.groups.add(Group.objects.get(name=role))
    return type(user).objects.get(pk=user.pk)  # permissions are cached on the instance


@pytest.fixture
def auditor(django_user_model):
    """Staff in the Auditors role (audit log, dashboard, cluster page); apps.core.authz.ROLES."""
    return _in_role(django_user_model.objects.create_user(username="auditor", password="pw-auditor-123",
                                                          is_staff=True), "Auditors")


@pytest.fixture
def plugin_admin(django_user_model):
    """Staff in the Plugin administrators role."""
    return _in_role(django_user_model.objects.create_user(username="plugadmin", password="pw-plugadmin-123",
                                                          is_staff=True), "Plugin administrators")


@pytest.fixture
def api_client():
    from rest_framework.test import APIClient

    return APIClient()


@pytest.fixture
def auth_client(api_client, user):
    api_client.force_authenticate(user)
    return api_client
