"""The web chat page: login, streaming, citations to the source view, feedback, history, isolation."""
from __future__ import annotations

import json

import pytest

from tests.conversations.conv_support import build_knowledge_base, reset_conversation_runtime

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def off_loop(fn):
    """Playwright's sync API runs an event loop in this thread; Django's ORM refuses to run inside one."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


@pytest.mark.django_db
def test_page_requires_login(client):
    resp = client.get("/")
    assert resp.status_code == 302 and resp["Location"].endswith("?next=/")


@pytest.mark.django_db
def test_page_renders_the_users_conversations_only(client, user, other_user):
    from apps.conversations.models import Conversation

    Conversation.objects.create(session_id="mine-000001", owner=user, title="My refund question")
    Conversation.objects.create(session_id="theirs-00001", owner=other_user, title="Bob's secret question")
    client.force_login(user)
    resp = client.get("/")
    assert resp.status_code == 200
    boot = json.loads(resp.content.decode().split('id="boot" type="application/json">')[1].split("</script>")[0])
    assert [c["title"] for c in boot["conversations"]] == ["My refund question"]
    assert "Bob's secret question" not in resp.content.decode()
    assert b"conversations/chat.js" in resp.content


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_chat_in_a_real_browser(user, other_user):
    from playwright.sync_api import sync_playwright

    from apps.conversations.models import Feedback
    from apps.conversations.services import chat_turn
    from tests.helpers import asgi_server

    reset_conversation_runtime()
    build_knowledge_base(user, slug="support")
    theirs = chat_turn(user=other_user, session_id="bob-private-01", message="How do I request a refund?")
    with asgi_server() as (addr, _proc), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        frames = []
        page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: frames.append(json.loads(payload))))

        page.goto(f"http://{addr}/")
        assert "/accounts/login/" in page.url
        page.fill("#id_username", "alice")
        page.fill("#id_password", "pw-alice-123")
        page.click("button[type=submit]")
        page.wait_for_selector("#message-input")
        assert page.url.rstrip("/").endswith(addr)
        # chat.js fills the select from the boot data after #message-input exists: wait for it, then count.
        page.wait_for_selector("#kb-select option[value=support]", state="attached", timeout=15000)
        assert page.locator("#kb-select option[value=support]").count() == 1

        page.fill("#message-input", "How do I request a refund?")
        page.keyboard.press("Enter")
        answer = page.locator(".msg.assistant .bubble:not(.streaming)").last
        answer.locator("a.cite").first.wait_for(timeout=60_000)
        assert "Request refund" in answer.inner_text()
        tokens = [f for f in frames if f["type"] == "token"]
        assert len(tokens) > 3 and frames[-1]["type"] == "answer"  # it streamed, then answered
        page.fill("#message-input", "and how long does that take?")
        page.keyboard.press("Enter")
        page.locator(".msg.assistant .bubble:not(.streaming)").nth(1).locator("a.cite").first.wait_for(timeout=60_000)
        second = page.locator(".msg.assistant .bubble").nth(1)
        assert "5 to 7 business days" in second.inner_text()
        page.locator(".conv").first.wait_for()
        assert page.locator(".conv a").first.inner_text() == "How do I request a refund?"
        page.screenshot(path="/tmp/conv_chat_page.png")

        # Feedback buttons record a rating.
        second.locator("button.fb[data-rating=up]").click()
        second.locator("button.fb.chosen[data-rating=up]").wait_for()
        assert off_loop(lambda: Feedback.objects.get().rating) == "up"

        # A citation opens the source view with the cited chunk highlighted, its heading shown.
        cite = second.locator("a.cite").first
        href = cite.get_attribute("href")
        assert href.startswith("/sources/") and "?chunk=" in href
        with page.context.expect_page() as opened:
            cite.click()
        source = opened.value
        source.wait_for_load_state()
        assert "5 to 7 business days" in source.locator("mark#cited").inner_text()
        assert "Requesting a refund" in source.content()
        source.screenshot(path="/tmp/conv_source_view.png")
        source.close()

        # New chat empties the page; the list reopens the conversation with its history and citations.
        page.click("#new-chat")
        page.wait_for_selector("#empty-state")
        page.locator(".conv a").first.click()
        page.locator(".msg.assistant a.cite").first.wait_for()
        assert page.locator(".msg.user").count() == 2
        assert page.locator(".fb.chosen[data-rating=up]").count() == 1

        # Another user's conversation cannot be opened from the page, nor streamed into.
        page.goto(f"http://{addr}/?c={theirs.session_id}")
        page.wait_for_selector(".error-note")
        assert "No such conversation" in page.locator(".error-note").first.inner_text()
        assert page.locator(".msg.user").count() == 0
        assert "How do I request a refund?" not in page.locator("#conversation-list").inner_text() or \
            page.locator(".conv").count() == 1
        browser.close()
    from apps.conversations.models import Message

    assert Message.objects.filter(conversation__session_id=theirs.session_id).count() == 2


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_a_refresh_mid_answer_resumes_the_stream(user):
    """A deliberately slow language model; the page is reloaded while the answer streams: the reloaded
    page shows the saved part at once, replays the turn's log and ends with the one complete answer."""
    from playwright.sync_api import sync_playwright

    from apps.conversations.models import Message
    from tests.conversations.slow_llm import SlowLLM
    from tests.helpers import asgi_server, server_env

    reset_conversation_runtime()
    build_knowledge_base(user, slug="support")
    llm = SlowLLM(delay=0.08, words=100)
    question = "How do I request a refund?"
    env = server_env(GENERATOR="openai", LLM_BASE_URL=llm.base_url, LLM_MODEL="slow", TURN_PERSIST_SECONDS="0.2")
    try:
        with asgi_server(env=env) as (addr, _proc), sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(f"http://{addr}/")
            page.fill("#id_username", "alice")
            page.fill("#id_password", "pw-alice-123")
            page.click("button[type=submit]")
            page.wait_for_selector("#message-input")
            page.fill("#message-input", question)
            page.keyboard.press("Enter")
            page.wait_for_function("() => (document.querySelector('.msg.assistant .bubble.streaming') || {})"
                                   ".textContent?.includes('-5')", timeout=60_000)
            assert "?c=" in page.url
            page.reload()
            # The saved part is shown at once, before the stream resumes.
            page.wait_for_selector(".msg.assistant .bubble.streaming", timeout=30_000)
            answer = page.locator(".msg.assistant .bubble:not(.streaming)").last
            answer.locator("a.cite").first.wait_for(timeout=60_000)
            page.screenshot(path="/tmp/conv_refresh_resumed.png")
            assert page.locator(".msg.user").count() == 1 and page.locator(".msg.assistant").count() == 1
            text = answer.inner_text()
            browser.close()
    finally:
        llm.stop()
    expected = llm.expected(question)
    assert expected.split(" [1]")[0] in text  # all of it, once (the marker is rendered as a link)
    rows = off_loop(lambda: list(Message.objects.values_list("role", "status", "content").order_by("id")))
    assert rows == [("user", "complete", question), ("assistant", "complete", expected)]
    assert len(llm.requests) == 1  # one generation: the refresh neither restarted nor duplicated it
