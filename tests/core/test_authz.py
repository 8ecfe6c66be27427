"""Issue 10 findings 2 and 5: API keys minting wider/longer keys, and is_staff acting as superuser.

Each test replays the attack that got through before and shows it is refused now.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Group, Permission
from django.utils import timezone
from rest_framework.test import APIClient

from apps.core import authz
from apps.core.errors import NotFound, PermissionDenied
from apps.core.models import ApiKey
from apps.core.services import api_key_create, api_key_revoke

pytestmark = pytest.mark.django_db


def bearer(raw_key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    return client


def _code(response) -> str:
    return response.json()["error"]["code"]


# --- finding 2: keys minting keys -----------------------------------------------------------------

def test_a_key_cannot_mint_a_key_that_never_expires_or_outlives_it(user):
    parent = api_key_create(user=user, expires_at=timezone.now() + timedelta(days=1))
    client = bearer(parent.raw_key)
    # The attack: POST /api-keys/ with Bearer auth and no expiry.
    child = client.post("/api/v1/api-keys/", {"name": "forever"}, format="json")
    assert child.status_code == 201
    assert child.json()["expires_at"] is not None and child.json()["parent"] == parent.api_key.pk
    assert ApiKey.objects.get(pk=child.json()["id"]).expires_at == parent.api_key.expires_at
    longer = client.post("/api/v1/api-keys/", {"expires_at": (timezone.now() + timedelta(days=30)).isoformat()},
                         format="json")
    assert longer.status_code == 403 and _code(longer) == "expiry_escalation"


def test_a_key_cannot_mint_wider_scopes_and_needs_the_keys_scope(user):
    narrow = api_key_create(user=user, scopes=["search", "keys"])
    client = bearer(narrow.raw_key)
    wider = client.post("/api/v1/api-keys/", {"scopes": ["search", "manage"]}, format="json")
    assert wider.status_code == 403 and _code(wider) == "scope_escalation"
    default = client.post("/api/v1/api-keys/", {}, format="json")
    assert default.status_code == 201 and default.json()["scopes"] == ["search", "keys"]
    no_keys = api_key_create(user=user, scopes=["chat"])
    refused = bearer(no_keys.raw_key).post("/api/v1/api-keys/", {"scopes": ["chat"]}, format="json")
    assert refused.status_code == 403 and _code(refused) == "scope_missing"


def test_revoking_a_key_revokes_what_it_minted_transitively(user):
    root = api_key_create(user=user)
    child_raw = bearer(root.raw_key).post("/api/v1/api-keys/", {}, format="json").json()["key"]
    grandchild_raw = bearer(child_raw).post("/api/v1/api-keys/", {}, format="json").json()["key"]
    assert bearer(grandchild_raw).get("/api/v1/me/").status_code == 200  # cached now
    api_key_revoke(user=user, key_id=root.api_key.pk)
    for raw in (root.raw_key, child_raw, grandchild_raw):  # the cache entries were dropped too
        assert bearer(raw).get("/api/v1/me/").status_code == 401
    assert ApiKey.objects.filter(user=user, revoked_at__isnull=True).count() == 0


def test_each_endpoint_checks_the_scope_it_needs(user):
    search_only = bearer(api_key_create(user=user, scopes=["search"]).raw_key)
    assert search_only.get("/api/v1/search/", {"q": "anything"}).status_code == 200
    assert search_only.get("/api/v1/me/").status_code == 200  # any key may ask whose it is
    for method, path, body in [("post", "/api/v1/chat/", {"message": "hi"}),
                               ("get", "/api/v1/knowledge-bases/", None),
                               ("post", "/api/v1/knowledge-bases/", {"slug": "x", "name": "x"}),
                               ("get", "/api/v1/api-keys/", None),
                               ("get", "/api/v1/conversations/", None)]:
        response = getattr(search_only, method)(path, body, format="json") if body else getattr(search_only, method)(path)
        assert response.status_code == 403 and _code(response) == "scope_missing", (method, path)
    reader = bearer(api_key_create(user=user, scopes=["read"]).raw_key)
    assert reader.get("/api/v1/knowledge-bases/").status_code == 200
    assert _code(reader.get("/api/v1/search/", {"q": "x"})) == "scope_missing"


# --- finding 5: is_staff is not a superuser ------------------------------------------------------

def test_staff_without_permissions_can_do_nothing(staff_user, user, other_user):
    from apps.knowledge.models import KnowledgeBase
    from apps.plugins.models import Ticket

    private = KnowledgeBase.objects.create(slug="private", name="Private", owner=other_user)
    Ticket.objects.create(user=other_user, subject="someone else's")
    theirs = api_key_create(user=other_user)
    client = APIClient()
    client.force_authenticate(staff_user)
    assert client.get(f"/api/v1/knowledge-bases/{private.pk}/").status_code == 404
    assert client.patch(f"/api/v1/knowledge-bases/{private.pk}/", {"name": "x"}, format="json").status_code == 404
    assert _code(client.get("/api/v1/plugins/")) == "plugin_admin_only"
    assert client.patch("/api/v1/plugins/http_api/", {"enabled": True}, format="json").status_code == 403
    assert client.get("/api/v1/support-tickets/").json() == []
    revoke = client.post(f"/api/v1/api-keys/{theirs.api_key.pk}/revoke/")
    assert revoke.status_code == 404 and ApiKey.objects.get(pk=theirs.api_key.pk).status == "active"
    for action in ("knowledge.create", "knowledge.read_all", "plugins.manage", "tickets.view_all", "audit.read",
                   "dashboard.view", "cluster.view", "api_keys.revoke_any", "api_keys.issue_for_others"):
        assert not authz.can(staff_user, action), action
    assert not authz.can(staff_user, "no.such.action")  # unknown actions fail closed


def test_roles_grant_what_they_name(staff_user, other_user):
    from apps.knowledge.models import KnowledgeBase

    kb = KnowledgeBase.objects.create(slug="team", name="Team", owner=other_user)
    editors = Group.objects.create(name="team-editors")
    kb.editor_groups.add(editors)
    staff_user.groups.add(editors, Group.objects.get(name="Support agents"))
    staff_user = type(staff_user).objects.get(pk=staff_user.pk)
    assert authz.can(staff_user, "knowledge.edit", kb) and authz.can(staff_user, "knowledge.read", kb)
    assert not authz.can(staff_user, "knowledge.delete", kb)  # deleting a base is its owner's
    assert authz.can(staff_user, "tickets.view_all") and not authz.can(staff_user, "plugins.manage")
    staff_user.is_active = False
    assert not authz.can(staff_user, "knowledge.edit", kb) and not authz.can(staff_user, "tickets.view_all")


def test_key_administrator_may_revoke_anyones_key(staff_user, other_user):
    theirs = api_key_create(user=other_user)
    with pytest.raises(NotFound):
        api_key_revoke(user=staff_user, key_id=theirs.api_key.pk)
    staff_user.user_permissions.add(Permission.objects.get(codename="revoke_any_apikey"))
    staff_user = type(staff_user).objects.get(pk=staff_user.pk)
    assert api_key_revoke(user=staff_user, key_id=theirs.api_key.pk).status == "revoked"


def test_admin_staff_user_cannot_create_a_key_for_another_user(client, staff_user, user, django_user_model):
    root = django_user_model.objects.create_superuser("root", "root@example.com", "pw-root-123")
    staff_user.user_permissions.add(*Permission.objects.filter(codename__in=["add_apikey", "view_apikey"]))
    client.force_login(staff_user)
    page = client.get("/admin/core/apikey/add/").content.decode()
    assert 'name="user"' not in page
    # The attack: post another user's id (a superuser's) anyway.
    response = client.post("/admin/core/apikey/add/", {"user": str(root.pk), "name": "pwn", "expires_at": "",
                                                       "scopes": ["chat"]})
    assert response.status_code == 302, response.content.decode()[:1500]
    key = ApiKey.objects.get(name="pwn")
    assert key.user_id == staff_user.pk and key.created_by_id is None
    assert not ApiKey.objects.filter(user=root).exists()
    with pytest.raises(PermissionDenied):
        api_key_create(user=root, issued_by=staff_user)


def test_superuser_issues_a_key_for_another_user_audited(client, user, django_user_model):
    from apps.monitoring.models import AuditEvent

    root = django_user_model.objects.create_superuser("root", "root@example.com", "pw-root-123")
    client.force_login(root)
    assert 'name="user"' in client.get("/admin/core/apikey/add/").content.decode()
    response = client.post("/admin/core/apikey/add/", {"user": str(user.pk), "name": "for-alice", "expires_at": "",
                                                       "scopes": ["chat", "search"]})
    assert response.status_code == 302
    key = ApiKey.objects.get(name="for-alice")
    assert key.user_id == user.pk and key.created_by_id == root.pk and key.scopes == ["search", "chat"]
    [event] = AuditEvent.objects.filter(model_label="core.ApiKey", object_id=str(key.pk), action="create")
    assert event.actor_label == "root"


def test_admin_knowledge_pages_follow_the_per_base_role(client, staff_user, other_user):
    from apps.knowledge.models import KnowledgeBase

    mine = KnowledgeBase.objects.create(slug="mine", name="Mine", owner=other_user)
    KnowledgeBase.objects.create(slug="secret", name="Secret", owner=other_user)
    client.force_login(staff_user)
    assert client.get("/admin/knowledge/knowledgebase/").status_code == 403  # staff, no role: nothing
    editors = Group.objects.create(name="mine-editors")
    mine.editor_groups.add(editors)
    staff_user.groups.add(editors)
    listing = client.get("/admin/knowledge/knowledgebase/")
    assert listing.status_code == 200
    html = listing.content.decode()
    assert "Mine" in html and "Secret" not in html
    secret = KnowledgeBase.objects.get(slug="secret")
    assert client.get(f"/admin/knowledge/knowledgebase/{secret.pk}/change/").status_code in (302, 403)


def test_create_api_key_command_takes_scopes(user):
    from io import StringIO

    from django.core.management import CommandError, call_command

    out = StringIO()
    call_command("create_api_key", "alice", "--scopes", "chat,search", stdout=out, stderr=StringIO())
    assert ApiKey.objects.get(user=user).scopes == ["search", "chat"]
    assert bearer(out.getvalue().strip()).get("/api/v1/knowledge-bases/").status_code == 403
    with pytest.raises(CommandError, match="invalid_scopes"):
        call_command("create_api_key", "alice", "--scopes", "root", stdout=StringIO(), stderr=StringIO())
