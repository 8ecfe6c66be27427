"""OpenID Connect sign-in against a real provider (node-oidc-provider): PKCE code flow, users and
groups from claims, knowledge-base access following the directory, API keys, websockets, logout."""
from __future__ import annotations

import json
import re
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest
import requests
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Group

from apps.accounts.models import DirectoryGroup, ExternalIdentity

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

ENGINEERING_DOC = (b"# Build servers\n\nThe build farm runs nightly at 02:00. To get access to the build farm, "
                   b"open a ticket with the platform team and name your project.\n")


def people(**overrides):
    users = {
        "alice": {"password": "alice-pw", "email": "alice@example.org", "name": "Alice Liddell",
                  "groups": ["engineering", "choir"]},
        "bob": {"password": "bob-pw", "email": "bob@example.org", "name": "Bob Builder", "groups": ["sales"]},
    }
    users.update(overrides)
    return users


def provider_round_trip(idp, authorize_url: str, login: str, password: str) -> str:
    """What a browser does at the provider: follow to the sign-in form, submit it, follow the
    redirects back; returns the callback URL (on http://testserver)."""
    browser = requests.Session()
    page = browser.get(authorize_url, timeout=10)
    assert page.status_code == 200, page.text[:500]
    action = re.search(r'action="([^"]+)"', page.text).group(1)
    response = browser.post(urljoin(page.url, action), data={"login": login, "password": password},
                            allow_redirects=False, timeout=10)
    while response.status_code in (302, 303):
        location = urljoin(response.url, response.headers["Location"])
        if location.startswith("http://testserver/"):
            return location
        response = browser.get(location, allow_redirects=False, timeout=10)
    raise AssertionError(f"the provider did not send us back: {response.status_code} {response.text[:300]}")


def sso_sign_in(client, idp, login: str, password: str, next_url: str = "/"):
    start = client.get("/oidc/authenticate/", {"next": next_url})
    assert start.status_code == 302, start.content[:300]
    authorize = start["Location"]
    query = parse_qs(urlsplit(authorize).query)
    # Authorization code with PKCE (S256), a nonce and state.
    assert query["response_type"] == ["code"] and query["code_challenge_method"] == ["S256"]
    assert query["code_challenge"][0] and query["nonce"][0] and query["state"][0]
    callback = urlsplit(provider_round_trip(idp, authorize, login, password))
    return client.get(f"{callback.path}?{callback.query}")


@pytest.fixture
def engineering_kb(kb_env, make_kb, load_docs, django_user_model):
    owner = django_user_model.objects.create_user("kb-owner", password="x")
    group = Group.objects.create(name="kb-engineering")
    kb = make_kb("engineering", owner=owner, groups=[group])
    load_docs(kb, {"build.md": ENGINEERING_DOC})
    return kb


def test_first_sign_in_creates_the_user_and_maps_groups(client, idp, settings, django_user_model):
    idp.set_users(people())
    settings.SSO_GROUP_RULES = "engineering=kb-engineering; sales={name}-team"
    response = sso_sign_in(client, idp, "alice", "alice-pw", next_url="/")
    assert response.status_code == 302 and response["Location"] == "/"
    user = django_user_model.objects.get(username="alice")
    assert (user.email, user.first_name, user.last_name) == ("alice@example.org", "Alice", "Liddell")
    assert not user.has_usable_password()
    assert set(user.groups.values_list("name", flat=True)) == {"kb-engineering"}  # "choir" has no rule
    assert ExternalIdentity.objects.get(user=user).provider == f"oidc:{idp.issuer}"
    assert DirectoryGroup.objects.filter(group__name="kb-engineering", source="oidc").exists()
    assert client.get("/api/v1/me/").json()["username"] == "alice"


def test_wrong_password_at_the_provider_never_signs_in(client, idp):
    idp.set_users(people())
    start = client.get("/oidc/authenticate/")
    browser = requests.Session()
    page = browser.get(start["Location"], timeout=10)
    action = re.search(r'action="([^"]+)"', page.text).group(1)
    again = browser.post(urljoin(page.url, action), data={"login": "alice", "password": "nope"}, timeout=10)
    assert "Invalid user or password" in again.text
    assert client.get("/api/v1/me/").status_code in (401, 403)


def test_directory_groups_decide_knowledge_base_access_and_removal_applies_at_next_sign_in(
        client_factory, idp, settings, engineering_kb):
    settings.SSO_GROUP_RULES = "engineering=kb-engineering"
    idp.set_users(people())
    alice, bob = client_factory(), client_factory()
    sso_sign_in(alice, idp, "alice", "alice-pw")
    sso_sign_in(bob, idp, "bob", "bob-pw")

    search = {"q": "how do I get access to the build farm", "kb": "engineering"}
    hits = alice.get("/api/v1/search/", search)
    assert hits.status_code == 200 and "build farm" in hits.json()["results"][0]["text"]
    chat = alice.post("/api/v1/chat/", {"message": "How do I get access to the build farm?",
                                        "knowledge_bases": ["engineering"]}, content_type="application/json")
    assert chat.status_code == 200 and "ticket" in chat.json()["answer"]
    refused = bob.get("/api/v1/search/", search)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "knowledge_base_not_found"

    # A key for machine clients: the owner's permissions, as the directory maps them.
    key = alice.post("/api/v1/api-keys/", {"name": "laptop"}, content_type="application/json").json()["key"]
    machine = client_factory()
    assert machine.get("/api/v1/search/", search, HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 200
    models = machine.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {key}")  # the OpenAI-compatible API
    assert "engineering" in {m["id"] for m in models.json()["data"]}

    # The directory drops alice from engineering: the next sign-in takes the group away, key included.
    idp.set_users(people(alice={**people()["alice"], "groups": ["choir"]}))
    sso_sign_in(alice, idp, "alice", "alice-pw")
    assert alice.get("/api/v1/search/", search).status_code == 404
    assert machine.get("/api/v1/search/", search, HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 404
    models = machine.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {key}")
    assert "engineering" not in {m["id"] for m in models.json()["data"]}


def test_groups_assigned_by_hand_survive_a_sign_in(client, idp, settings, django_user_model):
    settings.SSO_GROUP_RULES = "engineering=kb-engineering"
    idp.set_users(people())
    sso_sign_in(client, idp, "alice", "alice-pw")
    user = django_user_model.objects.get(username="alice")
    user.groups.add(Group.objects.create(name="hand-picked"))
    idp.set_users(people(alice={**people()["alice"], "groups": []}))
    sso_sign_in(client, idp, "alice", "alice-pw")
    assert set(user.groups.values_list("name", flat=True)) == {"hand-picked"}


def test_staff_and_superuser_follow_the_directory_when_configured(client, idp, settings, django_user_model):
    settings.SSO_STAFF_GROUPS = ["engineering"]
    settings.SSO_SUPERUSER_GROUPS = ["platform-admins"]
    idp.set_users(people())
    sso_sign_in(client, idp, "alice", "alice-pw")
    alice = django_user_model.objects.get(username="alice")
    assert alice.is_staff and not alice.is_superuser
    idp.set_users(people(alice={**people()["alice"], "groups": []}))
    sso_sign_in(client, idp, "alice", "alice-pw")
    alice.refresh_from_db()
    assert not alice.is_staff


def test_a_provider_cannot_hand_out_a_local_account(client, idp, django_user_model):
    """Same e-mail and same user name as a local superuser: a new, separate account is made."""
    root = django_user_model.objects.create_superuser("alice", "alice@example.org", "local-pw")
    idp.set_users(people())
    sso_sign_in(client, idp, "alice", "alice-pw")
    signed_in = django_user_model.objects.get(external_identities__subject="alice")
    assert signed_in.pk != root.pk and signed_in.username == "alice-2"
    assert not signed_in.is_superuser and not signed_in.is_staff
    assert client.get("/api/v1/me/").json()["username"] == "alice-2"


def test_the_same_identity_comes_back_to_the_same_account(client, idp, django_user_model):
    idp.set_users(people())
    sso_sign_in(client, idp, "alice", "alice-pw")
    client.post("/accounts/logout/")
    sso_sign_in(client, idp, "alice", "alice-pw")
    assert django_user_model.objects.filter(username__startswith="alice").count() == 1


def test_sign_out_ends_the_provider_session_too(client, idp):
    idp.set_users(people())
    sso_sign_in(client, idp, "alice", "alice-pw")
    response = client.post("/accounts/logout/")
    assert response.status_code == 302
    target = urlsplit(response["Location"])
    assert f"{target.scheme}://{target.netloc}" == idp.issuer and target.path == "/session/end"
    query = parse_qs(target.query)
    assert query["id_token_hint"][0].count(".") == 2
    assert query["post_logout_redirect_uri"] == ["http://testserver/accounts/login/"]
    assert client.get("/api/v1/me/").status_code in (401, 403)
    # The provider accepts the hint (it shows its sign-out confirmation, not an error).
    end = requests.get(response["Location"], timeout=10)
    assert end.status_code == 200 and "logout" in end.text.lower()


def test_an_unreachable_provider_is_a_message_not_an_error(client, settings):
    from apps.accounts import oidc
    from tests.helpers import free_port

    oidc.clear_discovery_cache()
    settings.OIDC_ISSUER = f"http://127.0.0.1:{free_port()}"
    settings.OIDC_RP_CLIENT_ID, settings.OIDC_RP_CLIENT_SECRET = "x", "y"
    response = client.get("/oidc/authenticate/", follow=True)
    assert response.status_code == 200
    assert b"cannot be reached" in response.content


def test_a_provider_naming_another_issuer_is_refused(client, idp, settings):
    from apps.accounts import oidc

    oidc.clear_discovery_cache()
    settings.OIDC_ISSUER = idp.issuer.replace("127.0.0.1", "localhost")
    response = client.get("/oidc/authenticate/", follow=True)
    assert response.status_code == 200 and b"cannot be reached" in response.content


@pytest.mark.parametrize("query", ["code=abc&state=forged", "error=access_denied&state=x", "code=abc"])
def test_forged_or_failed_callbacks_never_sign_in(client, idp, query):
    client.get("/oidc/authenticate/")  # a real state exists in the session; the callback's is not it
    response = client.get(f"/oidc/callback/?{query}", follow=True)
    assert response.status_code == 200 and b"did not complete" in response.content
    assert client.get("/api/v1/me/").status_code in (401, 403)


def test_password_sign_in_is_only_for_superusers_when_switched_off(client, settings, django_user_model):
    settings.PASSWORD_LOGIN = "superusers"
    django_user_model.objects.create_user("carol", password="carol-pw-123", is_staff=True)
    django_user_model.objects.create_superuser("root", "root@example.org", "root-pw-123")
    assert not client.login(username="carol", password="carol-pw-123")
    page = client.post("/admin/login/", {"username": "carol", "password": "carol-pw-123"})
    assert page.status_code == 200 and not page.wsgi_request.user.is_authenticated
    assert client.login(username="root", password="root-pw-123")


def test_sign_in_pages_offer_single_sign_on(client, idp, settings):
    settings.OIDC_PROVIDER_NAME = "Example SSO"
    for url in ("/accounts/login/", "/admin/login/"):
        page = client.get(url)
        assert page.status_code == 200 and b'id="sso-sign-in"' in page.content
        assert b"Sign in with Example SSO" in page.content


def test_a_signed_in_session_chats_over_the_websocket(client, idp, settings, engineering_kb):
    settings.SSO_GROUP_RULES = "engineering=kb-engineering"
    idp.set_users(people())
    sso_sign_in(client, idp, "alice", "alice-pw")
    cookie = f"sessionid={client.cookies['sessionid'].value}"

    async def chat():
        from kotaemon_site.asgi import application

        comm = WebsocketCommunicator(application, "/ws/chat/sso-session-0001/", headers=[
            (b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1"), (b"cookie", cookie.encode())])
        connected, _ = await comm.connect()
        assert connected
        await comm.send_to(text_data=json.dumps({"type": "message", "message": "How do I get build farm access?",
                                                 "knowledge_bases": ["engineering"]}))
        while True:
            frame = json.loads(await comm.receive_from(timeout=60))
            if frame["type"] in ("answer", "error"):
                await comm.disconnect()
                return frame

    frame = async_to_sync(chat)()
    assert frame["type"] == "answer" and "ticket" in frame["answer"]
