"""Structured JSON logs: every line is one JSON object carrying request id, session id and instance id,
and no secret or masked value ever appears, whatever a caller logs. Checked on real output: the
configured handler in-process, and the stdout of a real server process."""
from __future__ import annotations

import io
import json
import logging

import httpx
import pytest

from apps.core.logging import ContextFilter, JsonFormatter, log_context, redact
from tests.helpers import asgi_server, server_env

pytestmark = pytest.mark.django_db

CARD = "4111 1111 1111 1111"  # a Luhn-valid test card number
SECRETS = ["hunter2-very-secret", "ks_0123abcd_THISISTHESECRETPARTOFTHEKEY", "sk-live0123456789abcdefXYZ",
           "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dBjftJeZ4CVPmB92K27uhbUJU1p1r_wW1gFWFOEjXk",
           CARD, "alice.private@example.com"]


@pytest.fixture
def captured():
    """The project's formatter and filter on a buffer, attached where the console handler is."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    loggers = [logging.getLogger(), logging.getLogger("kotaemon.access"), logging.getLogger("django")]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        for lg, level in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)


def lines_of(stream: io.StringIO) -> list[dict]:
    raw = [line for line in stream.getvalue().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in raw]  # every line must be JSON
    for line in parsed:
        assert {"ts", "level", "logger", "message", "request_id", "session_id", "instance_id"} <= set(line), line
    return parsed


def assert_no_secrets(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked into the logs"
    assert "THISISTHESECRET" not in text and "hunter2" not in text


def test_request_lines_carry_the_ids_and_no_secrets(client, captured, settings, user):
    client.force_login(user)
    response = client.get(
        f"/api/v1/me/?password={SECRETS[0]}&api_key={SECRETS[1]}&access_token={SECRETS[3]}",
        HTTP_X_REQUEST_ID="req-abc-123", HTTP_X_SESSION_ID="sess-42",
    )
    assert response.status_code == 200 and response["X-Request-ID"] == "req-abc-123"
    lines = lines_of(captured)
    [access] = [line for line in lines if line["logger"] == "kotaemon.access"]
    assert access["request_id"] == "req-abc-123" and access["session_id"] == "sess-42"
    assert access["instance_id"] == settings.INSTANCE_ID
    assert access["status"] == 200 and access["method"] == "GET" and access["user_id"] == user.pk
    assert "/api/v1/me/?password=***" in access["message"]
    assert_no_secrets(captured.getvalue())


def test_generated_request_id_differs_per_request(client, captured):
    client.get("/healthz")  # probes are not access-logged
    client.get("/api/v1/me/")
    client.get("/api/v1/me/")
    access = [line for line in lines_of(captured) if line["logger"] == "kotaemon.access"]
    assert len(access) == 2 and access[0]["request_id"] != access[1]["request_id"]
    assert all(len(line["request_id"]) == 32 and line["session_id"] == "-" for line in access)


def test_careless_log_calls_are_redacted(captured, settings):
    log = logging.getLogger("apps.somewhere")
    with log_context(request_id="r-1", session_id="s-1"):
        log.info("login attempt password=%s with key %s", SECRETS[0], SECRETS[1],
                 extra={"token": "plain-token-value-123", "api_key": SECRETS[2], "payload": {"password": "x1y2z3w4",
                        "note": f"card {CARD} mail {SECRETS[5]}"}, "attempts": 3})
        log.warning("Authorization: Bearer %s", SECRETS[3])
        log.info("provider answered with %s", SECRETS[2])
        try:
            raise RuntimeError(f"could not charge {CARD} for {SECRETS[5]}")
        except RuntimeError:
            log.exception("payment failed")
    log.info("outside any context")
    text = captured.getvalue()
    assert_no_secrets(text)
    assert "plain-token-value-123" not in text and "x1y2z3w4" not in text
    lines = lines_of(captured)
    assert [(line["request_id"], line["session_id"]) for line in lines] == [("r-1", "s-1")] * 4 + [("-", "-")]
    first = lines[0]
    assert first["token"] == "***" and first["api_key"] == "***" and first["attempts"] == 3
    assert "ks_0123abcd_***" in first["message"]  # the public prefix stays: it names the key
    assert "RuntimeError" in lines[3]["exc"] and "[email]" in lines[3]["exc"]


def test_configured_patterns_and_secret_settings_are_masked(settings):
    from apps.core import logging as core_logging

    settings.SENSITIVE_PATTERNS = [r"EMP-\d{6}"]
    settings.LLM_API_KEY = "llm-provider-key-0000111122223333"
    core_logging._configured_patterns.cache_clear()
    try:
        masked = redact("employee EMP-123456 used llm-provider-key-0000111122223333")
        assert "EMP-123456" not in masked and "0000111122223333" not in masked
    finally:
        core_logging._configured_patterns.cache_clear()
    # Ordinary short numbers survive (long digit runs may be phone numbers and are masked).
    assert redact("order 12345678 took 1200 ms, 3 retries") == "order 12345678 took 1200 ms, 3 retries"
    assert redact("call +44 20 7946 0958") != "call +44 20 7946 0958"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_real_server_output_is_json_with_ids_and_without_secrets(user):
    from apps.core.services import api_key_create

    issued = api_key_create(user=user, name="log-test")
    env = server_env(ACCESS_LOG_LEVEL="INFO", LOG_LEVEL="INFO", LOG_FORMAT="json")
    with asgi_server(env) as (addr, proc):
        base = f"http://{addr}"
        ok = httpx.get(f"{base}/api/v1/me/?token={SECRETS[0]}", headers={
            "Authorization": f"Bearer {issued.raw_key}", "X-Request-ID": "req-real-1", "X-Session-ID": "sess-real"},
            timeout=30)
        assert ok.status_code == 200, ok.text
        bad = httpx.get(f"{base}/api/v1/me/", headers={"Authorization": f"Bearer {SECRETS[1]}",
                                                      "X-Request-ID": "req-real-2"}, timeout=30)
        assert bad.status_code == 401
        missing = httpx.get(f"{base}/api/v1/nothing-here/?password={SECRETS[0]}", timeout=30)
        assert missing.status_code == 404
        proc.terminate()
        proc.wait(timeout=30)
        output = proc.log_path.read_text(errors="replace")
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert lines, "the server wrote nothing"
    for line in lines:
        assert {"request_id", "session_id", "instance_id"} <= set(line)
        assert line["instance_id"] not in ("", "-")
    access = {line["request_id"]: line for line in lines if line["logger"] == "kotaemon.access"}
    assert access["req-real-1"]["session_id"] == "sess-real" and access["req-real-1"]["status"] == 200
    assert access["req-real-2"]["status"] == 401
    assert any(line["status"] == 404 for line in access.values())
    assert issued.raw_key not in output
    assert_no_secrets(output)
