import pytest

pytestmark = pytest.mark.django_db


def test_schema_lists_versioned_paths(client):
    response = client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["info"]["title"] == "kotaemon-site API"
    assert "/api/v1/me/" in schema["paths"] and "/api/v1/api-keys/{key_id}/revoke/" in schema["paths"]
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"}


def test_swagger_ui_served(client):
    response = client.get("/api/docs/")
    assert response.status_code == 200 and b"swagger" in response.content.lower()
