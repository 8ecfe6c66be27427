"""The interface in Chinese end to end, in headless Chromium with a zh-CN locale: sign-in, the chat page
(server-rendered and JavaScript strings), a Chinese answer with citations, the source view, the admin;
the language switch on the chat page and that the choice is remembered."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conversations.conv_support import build_knowledge_base, reset_conversation_runtime
from tests.conversations.test_conv_i18n import REFUNDS_ZH
from tests.conversations.test_conv_page import CHROMIUM, CHROMIUM_ARGS

SHOTS = Path(os.environ.get("KOTAEMON_SCREENSHOT_DIR", "/tmp/kotaemon-zh-screenshots"))


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_chinese_interface_in_a_real_browser(django_user_model):
    from playwright.sync_api import sync_playwright

    from tests.helpers import asgi_server

    reset_conversation_runtime()
    admin = django_user_model.objects.create_superuser(username="wang", password="pw-wang-123")
    build_knowledge_base(admin, slug="shouhou", docs={"售后服务.md": REFUNDS_ZH})
    SHOTS.mkdir(parents=True, exist_ok=True)
    with asgi_server() as (addr, _proc), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(locale="zh-CN", viewport={"width": 1280, "height": 860})
        page = context.new_page()

        page.goto(f"http://{addr}/")
        assert page.locator("h1").inner_text() == "登录 kotaemon-site"
        page.fill("#id_username", "wang")
        page.fill("#id_password", "pw-wang-123")
        page.click("button[type=submit]")
        page.wait_for_selector("#message-input")
        assert page.locator("html").get_attribute("lang") == "zh-hans"
        assert page.locator("#new-chat").inner_text() == "+ 新对话"
        assert page.locator("#message-input").get_attribute("placeholder") == "请输入问题…"
        assert page.locator("#send").inner_text() == "发送"
        assert "向公司的知识库提问" in page.locator("#empty-state").inner_text()
        assert page.locator("#language-select").input_value() == "zh-hans"

        page.fill("#message-input", "客服热线是多少？")
        page.keyboard.press("Enter")
        answer = page.locator(".msg.assistant .bubble:not(.streaming)").last
        answer.locator("a.cite").first.wait_for(timeout=90_000)
        text = answer.inner_text()
        assert "400-800-1234" in text and "客服热线" in text
        # Strings built by chat.js come from the JavaScript catalog.
        assert answer.locator("button.fb[data-rating=up]").inner_text() == "有帮助"
        assert answer.locator("button.fb[data-rating=down]").inner_text() == "没帮助"
        page.locator(".conv").first.wait_for()
        assert page.locator(".conv button").first.get_attribute("title") == "重命名"
        page.screenshot(path=str(SHOTS / "chat-zh.png"))

        cite = answer.locator("a.cite").first
        with context.expect_page() as opened:
            cite.click()
        source = opened.value
        source.wait_for_load_state()
        assert source.locator("html").get_attribute("lang") == "zh-hans"
        assert "版本 1" in source.locator(".meta").inner_text()
        assert "400-800-1234" in source.locator("mark#cited").inner_text()
        source.screenshot(path=str(SHOTS / "source-zh.png"))
        source.close()

        # The switch: English now, remembered on reload and in a new tab, over the zh-CN browser.
        page.select_option("#language-select", "en")
        page.wait_for_function("document.documentElement.lang === 'en'")
        page.wait_for_selector("#new-chat")
        assert page.locator("#new-chat").inner_text() == "+ New chat"
        assert page.locator("#language-select").input_value() == "en"
        assert "?c=" in page.url  # the open conversation stays open
        page.locator(".msg.assistant button.fb[data-rating=up]").first.wait_for()
        assert page.locator(".msg.assistant button.fb[data-rating=up]").first.inner_text() == "Helpful"
        page.reload()
        page.wait_for_selector("#new-chat")
        assert page.locator("#new-chat").inner_text() == "+ New chat"
        other = context.new_page()
        other.goto(f"http://{addr}/")
        assert other.locator("#send").inner_text() == "Send"
        other.close()
        page.select_option("#language-select", "zh-hans")
        page.wait_for_function("document.documentElement.lang === 'zh-hans'")
        assert page.locator("#new-chat").inner_text() == "+ 新对话"

        # The admin and its customisations, in Chinese.
        page.goto(f"http://{addr}/admin/")
        body = page.locator("body").inner_text()
        assert "运维" in body and "仪表盘" in body and "集群" in body
        page.screenshot(path=str(SHOTS / "admin-index-zh.png"), full_page=True)
        page.goto(f"http://{addr}/admin/dashboard/")
        assert page.locator("h1").first.inner_text() == "运维仪表盘"
        assert "每日回答数" in page.locator("body").inner_text()
        page.screenshot(path=str(SHOTS / "dashboard-zh.png"), full_page=True)
        page.goto(f"http://{addr}/admin/knowledge/knowledgebase/")
        assert "当前索引" in page.locator("#result_list").inner_text()
        page.locator("#result_list tbody a").first.click()
        page.wait_for_selector(".object-tools")
        assert "检索测试" in page.locator(".object-tools").inner_text()
        page.click("text=检索测试")
        page.fill("input[name=q]", "退款多久到账")
        page.click("input[type=submit]")
        page.wait_for_selector("table.scores")
        assert "得分" in page.locator("table.scores thead").inner_text()
        page.screenshot(path=str(SHOTS / "test-retrieval-zh.png"), full_page=True)
        browser.close()
