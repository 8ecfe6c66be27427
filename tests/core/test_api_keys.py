from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from apps.core.models import ApiKey
from apps.core.services import api_key_create, api_key_revoke, hash_api_key
from apps.core.errors import NotFound

pytestmark = pytest.mark.django_db


def bearer(client, key: str):
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def test_only_hash_is_stored_and_prefix_shown(user):
    issued = api_key_create(user=user, name="ci")
    row = ApiKey.objects.get(pk=issued.api_key.pk)
    assert issued.raw_key not in (row.key_hash, row.prefix, row.name)
    assert row.key_hash == hash_api_key(issued.raw_key)
    assert issued.raw_key.startswith(row.prefix + "_")


def test_bearer_key_authenticates(api_client, user):
    issued = api_key_create(user=user)
    response = bearer(api_client, issued.raw_key).get("/api/v1/me/")
    assert response.status_code == 200
    assert response.json()["username"] == "alice"
    assert ApiKey.objects.get(pk=issued.api_key.pk).last_used_at is not None


@pytest.mark.parametrize("header", ["Bearer ks_deadbeef_nope", "Bearer not-a-key"])
def test_wrong_key_is_refused_with_error_format(api_client, user, header):
    api_client.credentials(HTTP_AUTHORIZATION=header)
    response = api_client.get("/api/v1/me/")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "authentication_failed"
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_revoked_key_is_refused_immediately(api_client, user):
    issued = api_key_create(user=user)
    assert bearer(api_client, issued.raw_key).get("/api/v1/me/").status_code == 200
    api_key_revoke(user=user, key_id=issued.api_key.pk)
    assert api_client.get("/api/v1/me/").status_code == 401


def test_expired_key_is_refused(api_client, user):
    issued = api_key_create(user=user, expires_at=timezone.now() + timedelta(seconds=60))
    ApiKey.objects.filter(pk=issued.api_key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert bearer(api_client, issued.raw_key).get("/api/v1/me/").status_code == 401


def test_inactive_user_key_is_refused(api_client, user):
    issued = api_key_create(user=user)
    user.is_active = False
    user.save()
    assert bearer(api_client, issued.raw_key).get("/api/v1/me/").status_code == 401


def test_cannot_revoke_another_users_key(user, other_user):
    issued = api_key_create(user=other_user)
    with pytest.raises(NotFound):
        api_key_revoke(user=user, key_id=issued.api_key.pk)
    assert ApiKey.objects.get(pk=issued.api_key.pk).status == "active"


def test_rest_create_list_revoke(auth_client, other_user):
    created = auth_client.post("/api/v1/api-keys/", {"name": "laptop"}, format="json")
    assert created.status_code == 201
    body = created.json()
    assert body["key"].startswith(body["prefix"])
    api_key_create(user=other_user, name="not yours")
    listed = auth_client.get("/api/v1/api-keys/").json()
    assert [k["name"] for k in listed] == ["laptop"]
    assert "key" not in listed[0] and "key_hash" not in listed[0]
    revoked = auth_client.post(f"/api/v1/api-keys/{body['id']}/revoke/")
    assert revoked.json()["status"] == "revoked"
    foreign = ApiKey.objects.get(user=other_user)
    assert auth_client.post(f"/api/v1/api-keys/{foreign.pk}/revoke/").json()["error"]["code"] == "api_key_not_found"


def test_expiry_in_the_past_is_a_validation_error(auth_client):
    response = auth_client.post("/api/v1/api-keys/", {"expires_at": "2001-01-01T00:00:00Z"}, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_expiry"


def test_create_api_key_command_prints_key_once(user, api_client):
    out, err = StringIO(), StringIO()
    call_command("create_api_key", "alice", "--name", "cli", stdout=out, stderr=err)
    raw = out.getvalue().strip()
    assert ApiKey.objects.get(name="cli").key_hash == hash_api_key(raw)
    assert raw not in err.getvalue()
    assert bearer(api_client, raw).get("/api/v1/me/").status_code == 200


def test_create_api_key_command_unknown_user():
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="No user named"):
        call_command("create_api_key", "nobody")
