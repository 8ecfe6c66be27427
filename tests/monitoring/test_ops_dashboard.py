"""The operations dashboard: figures from real chat activity (real knowledge base, real retrieval),
charts rendered as SVG, staff only; and once in headless Chromium with a screenshot."""
from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

import pytest
from django.utils import timezone

from apps.monitoring.dashboard import dashboard_build, histogram_quantile, percentile, price_for

pytestmark = pytest.mark.django_db

ANSWERABLE = ["How do I request a refund?", "How long does standard delivery take?",
              "Can I exchange an item for a different size?"]
UNANSWERABLE = "What is the orbital period of Neptune's moons?"
SCREENSHOT_DIR = Path(os.environ.get("KOTAEMON_SCREENSHOT_DIR", Path(__file__).resolve().parents[2] / "var" / "screenshots"))


@pytest.fixture
def activity(user, other_user):
    """Real turns: three answered from the knowledge base, one without any relevant source (twice)."""
    from apps.conversations.services import chat_turn, feedback_submit
    from tests.conversations.conv_support import build_knowledge_base, reset_conversation_runtime

    reset_conversation_runtime()
    kb = build_knowledge_base(user, slug="support", public=True)
    replies = [chat_turn(user=user, session_id=None, message=q) for q in ANSWERABLE]
    lost = [chat_turn(user=u, session_id=None, message=UNANSWERABLE) for u in (user, other_user)]
    feedback_submit(user=user, message_id=replies[0].message_id, rating="up")
    feedback_submit(user=user, message_id=replies[1].message_id, rating="up")
    feedback_submit(user=user, message_id=lost[0].message_id, rating="down")
    yield {"kb": kb, "replies": replies, "lost": lost}
    reset_conversation_runtime()


@pytest.mark.slow  # the real knowledge base loads the embedding model
def test_figures_follow_real_activity(activity, auditor):
    board = dashboard_build(user=auditor, days=7)
    totals = board.totals
    assert len(board.day_labels) == 7 and board.day_labels[-1] == timezone.localdate().strftime("%m-%d")
    assert board.answers[-1] == 5 and sum(board.answers) == 5
    assert board.unanswered_per_day[-1] == 2
    assert (totals["feedback_up"], totals["feedback_down"]) == (2, 1)
    assert totals["feedback_up_rate"] == pytest.approx(2 / 3)
    [question] = board.unanswered
    assert question["question"] == UNANSWERABLE and question["count"] == 2
    assert board.latency_p50[-1] is not None and board.latency_p95[-1] >= board.latency_p50[-1] > 0
    assert [row["generator"] for row in board.cost_by_model] == ["extractive"]
    # Retrieval ran in this process: its histogram has the five searches.
    assert sum(row["count"] for row in board.retrieval) >= 5
    assert all(row["p95_ms"] >= row["p50_ms"] > 0 for row in board.retrieval)
    [kb] = board.knowledge_bases
    assert kb["slug"] == "support" and kb["active_version"] >= 1 and kb["chunks"] > 0
    assert board.session_store and all(0 <= row["rate"] <= 1 for row in board.session_store)


def test_token_cost_uses_the_configured_price_per_model(user, auditor, settings):
    from apps.conversations.models import Conversation, Message

    settings.LLM_PRICES = {"gpt-test": {"prompt": 0.002, "completion": 0.004}, "*": {"prompt": 1, "completion": 1}}
    conv = Conversation.objects.create(session_id="cost-1", owner=user)
    for prompt, completion in ((1000, 250), (500, 250)):
        Message.objects.create(conversation=conv, role="user", content="q")
        Message.objects.create(conversation=conv, role="assistant", content="a", generator="gpt-test",
                               prompt_tokens=prompt, completion_tokens=completion, latency_ms=10,
                               citations=[{"n": 1}])
    board = dashboard_build(user=auditor, days=1)
    [row] = board.cost_by_model
    assert (row["prompt_tokens"], row["completion_tokens"]) == (1500, 500)
    assert row["cost"] == pytest.approx(1.5 * 0.002 + 0.5 * 0.004)
    assert board.totals["cost"] == pytest.approx(0.005)
    assert board.prompt_tokens[-1] == 1500 and board.unanswered == []
    assert price_for("unknown-model") == {"prompt": 1.0, "completion": 1.0}


def test_plugin_failure_rate_from_the_invocation_log(auditor):
    from django.apps import apps

    PluginInvocation = apps.get_model("plugins", "PluginInvocation")
    for outcome in ("ok", "ok", "ok", "error", "timeout", "denied"):
        PluginInvocation.objects.create(plugin="order_query", stage="intent", outcome=outcome, duration_ms=12.0)
    PluginInvocation.objects.create(plugin="ticket_create", stage="intent", outcome="ok", duration_ms=5.0)
    board = dashboard_build(user=auditor, days=1)
    assert board.plugins_source == "database"
    rows = {row["plugin"]: row for row in board.plugins}
    assert (rows["order_query"]["calls"], rows["order_query"]["failures"]) == (6, 2)
    assert rows["order_query"]["rate"] == pytest.approx(2 / 6)
    assert rows["ticket_create"]["rate"] == 0


def test_old_activity_falls_outside_the_period(user, auditor):
    from apps.conversations.models import Conversation, Message

    conv = Conversation.objects.create(session_id="old-1", owner=user)
    old = Message.objects.create(conversation=conv, role="assistant", content="a")
    Message.objects.filter(pk=old.pk).update(created_at=timezone.now() - dt.timedelta(days=10))
    assert sum(dashboard_build(user=auditor, days=7).answers) == 0
    assert sum(dashboard_build(user=auditor, days=30).answers) == 1


@pytest.mark.slow
def test_page_renders_charts_for_staff_only(activity, client, auditor, staff_user, user):
    client.force_login(user)
    assert client.get("/admin/dashboard/").status_code == 302  # non-staff: to the admin login
    client.force_login(staff_user)
    assert client.get("/admin/dashboard/").status_code == 403  # staff without the auditor role
    client.force_login(auditor)
    response = client.get("/admin/dashboard/?days=7")
    assert response.status_code == 200
    html = response.content.decode()
    assert html.count("<svg") >= 7
    for card in ("answers", "feedback", "latency", "retrieval", "tokens", "plugins", "session", "instances",
                 "unanswered"):
        assert f'id="card-{card}"' in html
    assert UNANSWERABLE.replace("'", "&#x27;") in html
    assert re.search(r'id="tile-answers"><b>5</b>', html)
    assert "Answers per day" in html and "67%" in html
    index = client.get("/admin/").content.decode()
    assert "/admin/dashboard/" in index


def test_bad_period_is_a_clear_error(client, auditor):
    client.force_login(auditor)
    response = client.get("/admin/dashboard/?days=abc")
    assert response.status_code == 400 and "days must be a whole number" in response.content.decode()
    assert client.get("/admin/dashboard/?days=9999").status_code == 400


def test_selector_refuses_non_staff(user):
    from apps.core.errors import PermissionDenied

    with pytest.raises(PermissionDenied):
        dashboard_build(user=user)


def test_quantiles_match_their_definitions():
    assert percentile([], 0.5) is None
    assert percentile([5, 1, 3], 0.5) == 3
    assert percentile([1, 2, 3, 4], 0.95) == pytest.approx(3.85)
    # 10 observations <= 0.1 s, 10 more <= 0.2 s: the median is the first bucket's bound.
    buckets = [(0.1, 10.0), (0.2, 20.0), (float("inf"), 20.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_dashboard_in_headless_chromium(activity, auditor):
    """The page a staff member sees, in a real browser against a real server; a screenshot is kept."""
    import httpx
    from playwright.sync_api import sync_playwright

    from tests.helpers import asgi_server

    auditor.set_password("pw-editor-123")
    auditor.save()
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOT_DIR / "dashboard.png"
    with asgi_server() as (addr, _proc):
        base = f"http://{addr}"
        # Activity in the server process too, so its own retrieval and session-store figures move.
        with httpx.Client(base_url=base, timeout=60) as http:
            login = http.get("/admin/login/")
            token = http.cookies["csrftoken"]
            http.post("/admin/login/", data={"username": "auditor", "password": "pw-editor-123",
                                             "csrfmiddlewaretoken": token, "next": "/admin/"},
                      headers={"Referer": f"{base}/admin/login/"})
            for q in ANSWERABLE[:2] + [UNANSWERABLE]:
                r = http.post("/api/v1/chat/", json={"message": q},
                              headers={"X-CSRFToken": http.cookies["csrftoken"], "Referer": f"{base}/"})
                assert r.status_code in (200, 201), r.text
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(f"{base}/admin/login/?next=/admin/dashboard/")
                page.fill("#id_username", auditor.username)
                page.fill("#id_password", "pw-editor-123")
                page.click("input[type=submit]")
                page.wait_for_url(re.compile(r".*/admin/dashboard/.*"))
                page.wait_for_selector("#card-answers")  # signed in: the login page also has ?next=/admin/dashboard/
                page.screenshot(path=str(shot), full_page=True)
                charts = page.locator("svg.chart").count()
                bars = page.locator("#card-answers svg rect.bar").count()
                retrieval_rows = page.locator("#card-retrieval table tbody tr").count()
                unanswered = page.locator("#card-unanswered").inner_text()
                answers_box = page.locator("#card-answers svg").bounding_box()
            finally:
                browser.close()
    assert errors == []
    assert charts >= 7 and bars >= 2  # answered and unanswered segments today
    assert retrieval_rows >= 1
    assert UNANSWERABLE in unanswered
    assert answers_box and answers_box["width"] > 300 and answers_box["height"] > 100
    assert shot.stat().st_size > 20_000
