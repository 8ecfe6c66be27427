"""Audit log: changes made through the API, the admin, commands and code are recorded with the actor,
secret values never stored, rows read-only in the admin, filterable, exportable as CSV."""
from __future__ import annotations

import csv
import json
import io
import subprocess

import pytest

from apps.core.authz import ROLES
from django.contrib.auth.models import Group, Permission
from django.db import transaction

from apps.monitoring.audit import audit_actor, audited_models
from apps.monitoring.models import AuditEvent

pytestmark = pytest.mark.django_db


@pytest.fixture
def superuser(django_user_model):
    return django_user_model.objects.create_superuser(username="root", password="pw-root-123456", email="r@example.com")


def events(model_label: str, **filters):
    return list(AuditEvent.objects.filter(model_label=model_label, **filters).order_by("id"))


def test_api_key_create_and_revoke_through_the_api_are_audited_with_the_actor(auth_client, user):
    created = auth_client.post("/api/v1/api-keys/", {"name": "laptop"}, format="json")
    assert created.status_code == 201
    key_id, raw_key = created.json()["id"], created.json()["key"]

    [create] = events("core.ApiKey", action="create")
    assert (create.actor_id, create.actor_label, create.source) == (user.pk, "alice", "api")
    assert create.object_id == str(key_id)
    assert create.changes["name"] == {"after": "laptop"}
    assert create.changes["key_hash"] == {"after": "***"}  # the hash is a secret too: never stored
    assert raw_key.split("_")[-1] not in str(create.changes)

    revoked = auth_client.post(f"/api/v1/api-keys/{key_id}/revoke/")
    assert revoked.status_code == 200
    [update] = events("core.ApiKey", action="update")
    assert update.actor_label == "alice" and update.source == "api"
    assert list(update.changes) == ["revoked_at"]
    assert update.changes["revoked_at"]["before"] is None
    assert update.changes["revoked_at"]["after"].startswith(revoked.json()["revoked_at"][:16])
    assert "revoked_at: None →" in update.summary

    # Revoking again is a no-op in the service: no second row.
    auth_client.post(f"/api/v1/api-keys/{key_id}/revoke/")
    assert len(events("core.ApiKey", action="update")) == 1


def test_actor_authenticated_by_api_key_is_named_with_the_key_prefix(api_client, user):
    from apps.core.services import api_key_create

    issued = api_key_create(user=user, name="ci")
    other = api_key_create(user=user, name="old")
    response = api_client.post(f"/api/v1/api-keys/{other.api_key.pk}/revoke/",
                               HTTP_AUTHORIZATION=f"Bearer {issued.raw_key}")
    assert response.status_code == 200, response.content
    [update] = events("core.ApiKey", action="update")
    assert update.actor_id == user.pk
    assert update.actor_label == f"alice (API key {issued.api_key.prefix})"
    # Creations outside any request are the system's.
    assert {e.actor_label for e in events("core.ApiKey", action="create")} == {"system"}


def test_admin_changes_to_users_and_groups_are_audited(client, superuser, user):
    client.force_login(superuser)
    response = client.post("/admin/auth/group/add/", {"name": "editors", "permissions": []})
    assert response.status_code == 302, response.content[:500]
    group = Group.objects.get(name="editors")
    [create] = events("auth.Group", action="create", object_id=str(group.pk))  # the role groups exist too
    assert (create.actor_label, create.source, create.object_id) == ("root", "admin", str(group.pk))

    form = {
        "username": "alice", "first_name": "", "last_name": "", "email": "alice@example.com",
        "is_active": "on", "is_staff": "on", "groups": [str(group.pk)], "user_permissions": [],
        "last_login_0": "", "last_login_1": "", "date_joined_0": "2024-01-01", "date_joined_1": "00:00:00",
        "initial-date_joined_0": "2024-01-01", "initial-date_joined_1": "00:00:00",
    }
    response = client.post(f"/admin/auth/user/{user.pk}/change/", form)
    assert response.status_code == 302, response.content[:2000]
    user_events = events("auth.User", object_id=str(user.pk), action="update")
    summaries = [e.changes for e in user_events]
    assert {"is_staff": {"before": False, "after": True}}.items() <= {
        k: v for c in summaries for k, v in c.items()}.items()
    assert {"groups": {"added": ["editors"]}} in summaries
    assert all(e.actor_label == "root" and e.source == "admin" for e in user_events)


def test_password_and_permission_changes_never_store_the_secret(user):
    user.set_password("correct horse battery staple")
    user.save()
    [update] = events("auth.User", action="update", object_id=str(user.pk))
    assert update.changes == {"password": {"before": "***", "after": "***"}}
    assert "correct horse" not in str(update.changes) + update.summary
    assert "pbkdf2" not in str(update.changes)

    perm = Permission.objects.get(codename="view_auditevent")
    user.user_permissions.add(perm)
    [perm_event] = events("auth.User", action="update", changes__has_key="user_permissions")
    assert perm_event.changes["user_permissions"]["added"] == [str(perm)]


def test_reverse_and_clear_m2m_changes_are_recorded_on_the_user(user, other_user):
    group = Group.objects.create(name="support")
    group.user_set.add(user, other_user)  # the reverse side: recorded on each user
    for u in (user, other_user):
        [added] = events("auth.User", object_id=str(u.pk), changes__has_key="groups")
        assert added.changes == {"groups": {"added": ["support"]}}
    user.groups.clear()
    latest = events("auth.User", object_id=str(user.pk), changes__has_key="groups")[-1]
    assert latest.changes == {"groups": {"removed": ["support"]}}


def test_delete_records_the_last_state_and_rolled_back_changes_leave_no_row(user):
    group = Group.objects.create(name="temp")
    group_id = group.pk
    group.delete()
    [deleted] = events("auth.Group", action="delete")
    assert deleted.object_id == str(group_id) and deleted.changes["name"] == {"before": "temp"}

    with pytest.raises(RuntimeError):
        with transaction.atomic():
            Group.objects.create(name="never")
            raise RuntimeError("roll back")
    assert not AuditEvent.objects.filter(object_repr="never").exists()


def test_explicit_actor_and_update_fields_and_ignored_fields(user):
    with audit_actor("command:sync_directory"):
        user.first_name = "Alice"
        user.save(update_fields=["first_name"])
    [event] = events("auth.User", action="update")
    assert (event.actor_label, event.source) == ("command:sync_directory", "command")
    assert event.changes == {"first_name": {"before": "", "after": "Alice"}}
    # A login stamp is bookkeeping, not a change anyone made.
    from django.utils import timezone

    user.last_login = timezone.now()
    user.save(update_fields=["last_login"])
    assert len(events("auth.User", action="update")) == 1


def test_knowledge_base_changes_are_audited_when_the_app_is_installed(user):
    labels = {m._meta.label for m in audited_models()}
    assert {"core.ApiKey", "auth.User", "auth.Group"} <= labels
    from django.apps import apps

    KnowledgeBase = apps.get_model("knowledge", "KnowledgeBase")
    assert "knowledge.KnowledgeBase" in labels
    kb = KnowledgeBase.objects.create(slug="hr", name="HR")
    kb.is_public = True
    kb.save()
    kb.allowed_groups.add(Group.objects.create(name="staff"))
    actions = [(e.action, sorted(e.changes)) for e in events("knowledge.KnowledgeBase", object_id=str(kb.pk))]
    assert actions[0][0] == "create" and "name" in actions[0][1]
    assert ("update", ["is_public"]) in actions and ("update", ["allowed_groups"]) in actions
    # content_revision is bumped by indexing (non-editable): no audit row of its own.
    before = AuditEvent.objects.count()
    KnowledgeBase.objects.get(pk=kb.pk).save()
    assert AuditEvent.objects.count() == before


class TestAdminView:
    def test_rows_are_visible_and_filterable_but_never_editable(self, client, superuser, user):
        Group.objects.create(name="g1")
        user.first_name = "Al"
        user.save()
        client.force_login(superuser)
        listing = client.get("/admin/monitoring/auditevent/?action__exact=update")
        assert listing.status_code == 200
        html = listing.content.decode()
        assert "first_name" in html and "g1" not in html  # the filter hides the group creation
        assert "/admin/monitoring/auditevent/add/" not in html
        assert client.get("/admin/monitoring/auditevent/add/").status_code == 403
        event = AuditEvent.objects.filter(action="update").first()
        detail = client.get(f"/admin/monitoring/auditevent/{event.pk}/change/")
        assert detail.status_code == 200 and 'name="_save"' not in detail.content.decode()
        before = AuditEvent.objects.get(pk=event.pk).summary
        client.post(f"/admin/monitoring/auditevent/{event.pk}/change/", {"summary": "forged"})
        assert AuditEvent.objects.get(pk=event.pk).summary == before
        assert client.post(f"/admin/monitoring/auditevent/{event.pk}/delete/", {"post": "yes"}).status_code == 403
        bulk = client.post("/admin/monitoring/auditevent/", {"action": "delete_selected", "_selected_action": [event.pk],
                                                              "post": "yes"})
        assert bulk.status_code in (200, 302)
        assert AuditEvent.objects.filter(pk=event.pk).exists()
        with pytest.raises(ValueError):
            event.delete()

    def test_csv_export_follows_the_filters_and_contains_no_secrets(self, client, superuser, user):
        from apps.core.services import api_key_create

        issued = api_key_create(user=user, name="=HYPERLINK(\"http://evil\")")
        Group.objects.create(name="g2")
        client.force_login(superuser)
        listing = client.get("/admin/monitoring/auditevent/?model_label__exact=core.ApiKey")
        assert "audit-export-csv" in listing.content.decode()
        response = client.get("/admin/monitoring/auditevent/export/?model_label__exact=core.ApiKey")
        assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
        body = b"".join(response.streaming_content).decode()
        rows = list(csv.reader(io.StringIO(body)))
        assert rows[0] == ["time", "actor", "source", "action", "model", "object_id", "object", "changes",
                           "request_id"]
        assert [r[4] for r in rows[1:]] == ["core.ApiKey"]
        assert issued.raw_key not in body and issued.api_key.key_hash not in body
        assert "name='=HYPERLINK" in rows[1][7] and not rows[1][6].startswith("=")

        action = client.post("/admin/monitoring/auditevent/", {
            "action": "export_selected_csv",
            # The role groups created by migrate (apps.core.authz.ROLES) have audit rows of their own.
            "_selected_action": list(AuditEvent.objects.filter(model_label="auth.Group")
                                     .exclude(object_repr__in=list(ROLES)).values_list("pk", flat=True)),
        })
        rows = list(csv.reader(io.StringIO(b"".join(action.streaming_content).decode())))
        assert [r[6] for r in rows[1:]] == ["g2"]

    def test_non_staff_and_staff_without_permission_cannot_read(self, client, user, staff_user):
        client.force_login(user)
        assert client.get("/admin/monitoring/auditevent/export/").status_code == 302  # to the login page
        client.force_login(staff_user)
        assert client.get("/admin/monitoring/auditevent/").status_code == 403
        assert client.get("/admin/monitoring/auditevent/export/").status_code == 403
        from apps.core.errors import PermissionDenied
        from apps.monitoring.selectors import audit_events_list

        with pytest.raises(PermissionDenied):
            audit_events_list(user=staff_user)
        staff_user.user_permissions.add(Permission.objects.get(codename="view_auditevent"))
        staff_user = type(staff_user).objects.get(pk=staff_user.pk)
        assert list(audit_events_list(user=staff_user, model_label="auth.User")) != []
        client.force_login(staff_user)
        assert client.get("/admin/monitoring/auditevent/export/").status_code == 200


@pytest.mark.django_db(transaction=True)
def test_management_command_is_named_as_the_actor(user):
    from tests.helpers import ROOT, VENV_BIN, server_env

    result = subprocess.run([str(VENV_BIN / "python"), "manage.py", "create_api_key", "alice", "--name", "cron"],
                            cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    [event] = events("core.ApiKey", action="create")
    assert (event.actor_label, event.source) == ("command:create_api_key", "command")
    assert event.changes["name"] == {"after": "cron"}


def test_plugin_config_changes_are_audited_without_secrets(user):
    from django.apps import apps

    PluginConfig = apps.get_model("plugins", "PluginConfig")
    with audit_actor("command:configure_plugins"):
        cfg = PluginConfig.objects.create(name="order_query", config={
            "base_url": "https://orders.example.com", "api_key": "sk-orders-0123456789abcdef", "retries": 2},
            secrets_encrypted="gAAAAABencryptedpayload0123456789")
        cfg.enabled = True
        cfg.config = dict(cfg.config, retries=3)
        cfg.save()
    create, update = events("plugins.PluginConfig")
    assert create.action == "create" and create.actor_label == "command:configure_plugins"
    assert create.changes["config"]["after"] == {"base_url": "https://orders.example.com", "api_key": "***",
                                                 "retries": 2}
    assert create.changes["secrets_encrypted"] == {"after": "***"}
    assert update.changes["enabled"] == {"before": False, "after": True}
    assert update.changes["config"]["before"]["retries"] == 2 and update.changes["config"]["after"]["retries"] == 3
    dump = json.dumps([create.changes, update.changes]) + create.summary + update.summary
    assert "sk-orders" not in dump and "encryptedpayload" not in dump


def test_document_delete_and_retitle_through_the_service_are_audited(user, settings, tmp_path):
    """Soft delete and a new title are saves (not bulk updates), so the audit log records them."""
    from apps.knowledge.models import Document, KnowledgeBase
    from apps.knowledge.services import document_delete, document_import

    kb = KnowledgeBase.objects.create(slug="ops", name="Ops", owner=user)
    outcome = document_import(knowledge_base=kb, user=user, name="runbook.md", data=b"# Runbook\n\nRestart it.")
    document = outcome.document
    document_import(knowledge_base=kb, user=user, name="runbook.md", data=b"# Runbook\n\nRestart it.",
                    title="Operations runbook")
    with audit_actor("command:cleanup_docs"):
        document_delete(document=Document.objects.get(pk=document.pk), user=user)
    changed = [sorted(e.changes) for e in events("knowledge.Document", object_id=str(document.pk), action="update")]
    assert ["title"] in changed
    deletion = [e for e in events("knowledge.Document", object_id=str(document.pk), action="update")
                if "deleted_at" in e.changes]
    assert len(deletion) == 1 and deletion[0].actor_label == "command:cleanup_docs"
