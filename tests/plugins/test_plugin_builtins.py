"""Built-in plugins against real servers: order_query, ticket_create, http_api."""
from __future__ import annotations

import logging

import pytest

from apps.plugins.models import PluginInvocation, Ticket
from apps.plugins.services import plugin_invoke, plugins_snapshot
from tests.plugins.order_service import order_service

pytestmark = pytest.mark.django_db


@pytest.fixture
def orders():
    with order_service() as service:
        yield service


def _call(user, name, method, intent, *, slots=None, message="where is my order", history=None, turn=None):
    view = plugins_snapshot().plugins[name]
    ctx = {"message": message, "query": message, "conversation_id": 7, "history": history or [], "sources": [],
           "plugin_results": [], "answer": None}
    return plugin_invoke(view=view, stage="intent", method=method, user=user, ctx=ctx, intent=intent,
                         confidence=0.9, slots=slots or {}, turn=turn)


def test_order_query_lists_the_users_orders(plugins_dir, enable, user, orders):
    enable("order_query", allowed_hosts=[orders.host], config={"base_url": orders.url}, secrets={"api_token": "order-token-1"})
    outcome = _call(user, "order_query", "query_order", "query_order")
    assert outcome.outcome == "ok", outcome
    content = outcome.result["content"]
    assert "Order A1001: status in transit; delayed (carrier backlog after a storm)" in content
    assert "expected delivery 2026-11-20" in content and "Order A0999: status delivered" in content
    assert outcome.result["url"] == "https://track.example.com/A1001"
    [request] = orders.requests
    assert request["path"] == f"/users/{user.pk}/orders"  # the verified id, never something from the message
    assert request["headers"]["Authorization"] == "Bearer order-token-1"


def test_order_query_single_order_and_unknown_order(plugins_dir, enable, user, orders):
    enable("order_query", allowed_hosts=[orders.host], config={"base_url": orders.url, "user_key": "username"})
    found = _call(user, "order_query", "query_order", "query_order", slots={"order_id": "A1001"})
    assert found.result["title"] == "Order A1001 (order service)"
    assert orders.requests[-1]["path"] == "/users/alice/orders/A1001"
    missing = _call(user, "order_query", "query_order", "query_order", slots={"order_id": "Z404"})
    assert missing.outcome == "ok" and missing.result["content"] == "No order Z404 was found on your account."


def test_refund_status(plugins_dir, enable, user, orders):
    enable("order_query", allowed_hosts=[orders.host], config={"base_url": orders.url})
    outcome = _call(user, "order_query", "refund_status", "refund_status", message="did my refund go through yet")
    assert outcome.result["content"] == ("Refund for order A0999: status completed; amount 12.5 EUR; "
                                         "requested 2026-10-10; completed 2026-10-14.")


def test_order_service_down_or_failing_is_a_recorded_error(plugins_dir, enable, user, orders):
    from tests.helpers import free_port

    enable("order_query", allowed_hosts=[orders.host], config={"base_url": orders.url})
    orders.fail = True
    failing = _call(user, "order_query", "query_order", "query_order")
    assert (failing.outcome, failing.error_code) == ("error", "http_status")
    port = free_port()
    enable("order_query", allowed_hosts=[f"127.0.0.1:{port}"], config={"base_url": f"http://127.0.0.1:{port}"})
    down = _call(user, "order_query", "query_order", "query_order")
    assert (down.outcome, down.error_code) == ("error", "http_unreachable")
    assert PluginInvocation.objects.filter(plugin="order_query", outcome="error").count() == 2


def test_ticket_create_opens_a_ticket_staff_see_in_the_admin(plugins_dir, enable, user, other_user, client,
                                                             django_user_model, api_client):
    enable("ticket_create", config={"priority": "high"})
    history = [{"role": "user", "content": "my invoice is wrong"}, {"role": "assistant", "content": "Sorry!"}]
    turn = {"conversation_id": 7, "session_id": "sess-9",
            "transcript": history + [{"role": "user", "content": "get me a human please"}]}
    outcome = _call(user, "ticket_create", "hand_off", "human_handoff", message="get me a human please",
                    history=history, turn=turn)
    assert outcome.outcome == "ok", outcome
    ticket = Ticket.objects.get()
    assert ticket.number == f"T-{ticket.pk:06d}" and ticket.user == user and ticket.priority == "high"
    assert ticket.subject == "Chat handoff: get me a human please"
    assert ticket.transcript[0] == {"role": "user", "content": "my invoice is wrong"}
    assert (ticket.conversation_id, ticket.session_id, ticket.source_plugin) == (7, "sess-9", "ticket_create")
    assert ticket.number in outcome.result["content"] and "alice@example.com" in outcome.result["content"]
    assert outcome.patch == {"skip_retrieval": True}

    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw-root-123")
    client.force_login(admin)
    page = client.get("/admin/plugins/ticket/")
    assert page.status_code == 200 and ticket.number in page.content.decode()
    detail = client.get(f"/admin/plugins/ticket/{ticket.pk}/change/").content.decode()
    assert "my invoice is wrong" in detail

    api_client.force_authenticate(user)
    assert [t["number"] for t in api_client.get("/api/v1/support-tickets/").json()] == [ticket.number]
    api_client.force_authenticate(other_user)
    assert api_client.get("/api/v1/support-tickets/").json() == []


def test_http_api_is_configured_entirely_from_settings(plugins_dir, enable, user, orders, caplog, client,
                                                       django_user_model):
    caplog.set_level(logging.DEBUG)
    secret = "tok-" + "q" * 24
    enable("http_api", allowed_hosts=[orders.host], config={
        "intent": "check_request", "examples": ["is my request approved"],
        "keywords": [r"request (?P<request_id>\d+)"],
        "url_template": orders.url + "/api/status/{user.username}?request={slot.request_id}&q={message}",
        "headers": {"Authorization": "Bearer {secret}", "X-User": "{user.email}"},
        "response_field": "data.status", "answer_template": "Your request is {value}.", "title": "Requests"},
        secrets={"secret": secret})
    outcome = _call(user, "http_api", "call_api", "check_request", slots={"request_id": "42"},
                    message="is request 42 approved & done?")
    assert outcome.outcome == "ok", outcome
    assert outcome.result == {"title": "Requests", "content": "Your request is approved.", "url": None,
                              "data": {"value": "approved", "field": "data.status"}}
    request = orders.requests[-1]
    assert request["path"] == "/api/status/alice?request=42&q=is%20request%2042%20approved%20%26%20done%3F"
    assert request["headers"]["Authorization"] == f"Bearer {secret}"
    assert request["headers"]["X-User"] == "alice@example.com"
    assert plugins_snapshot().plugins["http_api"].intents()[0].intent == "check_request"

    missing_field = enable("http_api", allowed_hosts=[orders.host], config={
        "intent": "check_request", "examples": ["x is approved"], "url_template": orders.url + "/api/status/{user.id}",
        "response_field": "data.nope"})
    assert missing_field.enabled
    failed = _call(user, "http_api", "call_api", "check_request")
    assert (failed.outcome, failed.error_code) == ("error", "field_missing")

    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw-root-123")
    client.force_login(admin)
    row_id = plugins_snapshot().plugins["http_api"].row_id
    page = client.get(f"/admin/plugins/pluginconfig/{row_id}/change/").content.decode()
    assert "Secret: secret" in page and "set; leave blank to keep" in page
    assert secret not in page
    assert secret not in caplog.text


def test_http_api_never_allows_the_host_of_its_own_url_template(plugins_dir, enable, user, orders, settings):
    """Finding 6: the URL template's host is not an allow-list; the admin lists hosts explicitly, and the
    outbound gate still refuses internal addresses that are not on the operator's on-premise list."""
    config = {"intent": "check_request", "examples": ["is my request approved"],
              "url_template": orders.url + "/api/status/{user.id}", "response_field": "data.status"}
    enable("http_api", config=config)
    assert plugins_snapshot().plugins["http_api"].allowed_hosts == []
    refused = _call(user, "http_api", "call_api", "check_request")
    assert (refused.outcome, refused.error_code) == ("denied", "host_not_allowed") and orders.requests == []
    enable("http_api", config=config, allowed_hosts=[orders.host])
    settings.OUTBOUND_ALLOWED_HOSTS = []
    internal = _call(user, "http_api", "call_api", "check_request")
    assert (internal.outcome, internal.error_code) == ("denied", "address_not_allowed") and orders.requests == []
    metadata = enable("http_api", config=dict(config, url_template="http://169.254.169.254/latest/meta-data/"),
                      allowed_hosts=["169.254.169.254"])
    assert metadata.enabled
    settings.OUTBOUND_ALLOWED_HOSTS = ["169.254.169.254", "127.0.0.1"]
    meta = _call(user, "http_api", "call_api", "check_request")
    assert (meta.outcome, meta.error_code) == ("denied", "address_not_allowed")


def test_example_plugin_from_plugins_local(plugins_dir, settings, enable, user, orders):
    """The documented example (plugins_local/leave_balance.py): demo allowance, then a real HR API."""
    from django.core.cache import cache

    from apps.plugins.services import _cache_key
    from tests.helpers import ROOT

    settings.PLUGINS_DIR = ROOT / "plugins_local"
    enable("leave_balance", config={"annual_days": 20})
    cache.set(_cache_key("leave_balance", "user", user.pk, "annual_taken"), 5)
    demo = _call(user, "leave_balance", "balance", "leave_balance", message="got any PTO left?")
    assert demo.result["content"] == "alice has 15 days of annual leave and 10 sick days left."
    assert cache.get(_cache_key("leave_balance", "plugin", None, "setups")) == 1

    enable("leave_balance", allowed_hosts=[orders.host], config={"hr_api_url": orders.url}, secrets={"hr_api_token": "hr-token"})
    live = _call(user, "leave_balance", "balance", "leave_balance", message="got any PTO left?")
    assert live.result["data"] == {"annual_remaining": 12, "sick_remaining": 4}
    assert orders.requests[-1]["path"] == "/employees/alice%40example.com/leave"
    assert orders.requests[-1]["headers"]["Authorization"] == "Bearer hr-token"
