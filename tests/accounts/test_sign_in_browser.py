"""Single sign-on in a real browser: Chromium, a uvicorn server and the OpenID provider, end to end."""
from __future__ import annotations

import pytest
from django.contrib.auth.models import Group

from tests.conversations.conv_support import reset_conversation_runtime
from tests.conversations.test_conv_page import CHROMIUM, CHROMIUM_ARGS
from tests.helpers import asgi_server, server_env

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.django_db(transaction=True)]

DOC = (b"# Travel policy\n\nBook flights through the travel desk at least 14 days ahead. Economy class is "
       b"the rule for flights under six hours.\n")


def test_sign_in_chat_and_sign_out_through_the_identity_provider(idp, make_kb, load_docs, django_user_model,
                                                               tmp_path):
    from playwright.sync_api import sync_playwright

    reset_conversation_runtime()
    owner = django_user_model.objects.create_user("policy-owner", password="x")
    kb = make_kb("travel", owner=owner, groups=[Group.objects.create(name="staff-travel")])
    load_docs(kb, {"travel.md": DOC})
    idp.set_users({"mei": {"password": "mei-pw", "email": "mei@example.org", "name": "Mei Lin",
                           "groups": ["all-staff"]}})
    port = idp.live_ports[0]
    env = server_env(OIDC_ISSUER=idp.issuer, OIDC_CLIENT_ID=idp.client_id, OIDC_CLIENT_SECRET=idp.client_secret,
                     OIDC_SCOPES="openid email profile groups", OIDC_PROVIDER_NAME="Example IdP",
                     SSO_GROUP_RULES="all-staff=staff-travel", PASSWORD_LOGIN="superusers")
    with asgi_server(env=env, port=port) as (addr, _proc), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(f"http://{addr}/")
        assert "/accounts/login/" in page.url
        assert page.locator("#sso-sign-in").inner_text() == "Sign in with Example IdP"
        page.click("#sso-sign-in")
        page.wait_for_selector("#idp-login")
        assert page.url.startswith(idp.issuer)
        page.fill("#idp-login", "mei")
        page.fill("#idp-password", "mei-pw")
        page.click("#idp-submit")
        page.wait_for_selector("#message-input", timeout=60_000)
        assert page.url.rstrip("/") == f"http://{addr}"
        # chat.js fills the selector after the page has loaded: wait for it (an immediate count raced it)
        page.wait_for_selector("#kb-select option[value=travel]", state="attached", timeout=30_000)
        assert page.locator("#kb-select option[value=travel]").count() == 1  # granted by the directory group

        page.fill("#message-input", "How early do I need to book a flight?")
        page.keyboard.press("Enter")
        answer = page.locator(".msg.assistant .bubble:not(.streaming)").last
        try:
            answer.locator("a.cite").first.wait_for(timeout=120_000)
        except Exception:
            page.screenshot(path=str(tmp_path / "sso-chat-failed.png"))
            raise AssertionError(f"no cited answer; page shows: {page.locator('#messages').inner_text()[:800]!r}")
        assert "14 days" in answer.inner_text()
        page.screenshot(path=str(tmp_path / "sso-chat.png"))

        page.click("form[action='/accounts/logout/'] button")
        page.wait_for_load_state()
        assert page.url.startswith(f"{idp.issuer}/session/end")  # the provider asks to end its session too
        browser.close()
    mei = django_user_model.objects.get(username="mei")
    assert mei.external_identities.get().provider == f"oidc:{idp.issuer}"
