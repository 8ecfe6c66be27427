"""Every API error has one shape: {"error": {"code", "message", "details"}}."""
import pytest
from django.test import override_settings
from django.urls import path
from rest_framework.views import APIView

pytestmark = pytest.mark.django_db


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code and body["error"]["message"]
    return body["error"]


def test_not_authenticated(api_client):
    assert_error(api_client.get("/api/v1/me/"), 401, "not_authenticated")


def test_unknown_api_path_is_json_404(auth_client):
    assert_error(auth_client.get("/api/v1/no-such-thing/"), 404, "not_found")


def test_method_not_allowed(auth_client):
    assert_error(auth_client.delete("/api/v1/me/"), 405, "method_not_allowed")


def test_validation_error_lists_fields(auth_client):
    error = assert_error(auth_client.post("/api/v1/api-keys/", {"name": "x" * 500}, format="json"), 400,
                         "validation_error")
    assert "name" in error["details"]["fields"]


def test_malformed_json_is_parse_error(auth_client):
    response = auth_client.generic("POST", "/api/v1/api-keys/", "{not json", content_type="application/json")
    assert_error(response, 400, "parse_error")


class Boom(APIView):
    permission_classes: list = []

    def get(self, request):
        raise RuntimeError("kaboom")


class Throttled(APIView):
    permission_classes: list = []
    throttle_scope = "user"

    def get(self, request):
        from rest_framework.exceptions import Throttled

        raise Throttled(wait=7)


urlpatterns = [path("api/v1/boom/", Boom.as_view()), path("api/v1/throttled/", Throttled.as_view())]


@override_settings(ROOT_URLCONF=__name__)
def test_server_error_is_json_not_html(client):
    error = assert_error(client.get("/api/v1/boom/"), 500, "server_error")
    assert "kaboom" not in error["message"]


@override_settings(ROOT_URLCONF=__name__, DEBUG=True)
def test_server_error_is_json_even_with_debug(client):
    assert_error(client.get("/api/v1/boom/"), 500, "server_error")


@override_settings(ROOT_URLCONF=__name__)
def test_throttled_carries_retry_after(client):
    response = client.get("/api/v1/throttled/")
    error = assert_error(response, 429, "throttled")
    assert error["details"]["retry_after_seconds"] == 7 and response["Retry-After"] == "7"


def test_rate_limit_per_user_gives_429(auth_client, monkeypatch):
    from rest_framework.throttling import SimpleRateThrottle

    monkeypatch.setattr(SimpleRateThrottle, "THROTTLE_RATES", {"user": "3/min", "chat": "30/min"})
    codes = [auth_client.get("/api/v1/me/").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]


@pytest.mark.django_db
def test_unknown_paths_of_the_openai_compatible_api_answer_json(client):
    response = client.get("/v1/no-such-thing")
    assert response.status_code == 404 and response["Content-Type"].startswith("application/json")
    assert response.json()["error"]["code"] == "not_found" and response.json()["error"]["message"]
