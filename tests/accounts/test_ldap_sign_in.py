"""LDAP sign-in against a real OpenLDAP server (slapd) seeded by the test: group mapping, access to
knowledge bases following the directory, StartTLS, and the guard against taking over local accounts."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from django.contrib.auth import authenticate
from django.contrib.auth.models import Group

from apps.accounts.models import ExternalIdentity
from tests.helpers import ROOT

pytestmark = [pytest.mark.django_db, pytest.mark.slow]

DOC = (b"# Support rota\n\nThe support rota is published every Friday. Swap a shift by asking the "
       b"team lead on duty at least two days before.\n")


@pytest.fixture
def people(slapd):
    """Fresh names per test (the directory lives for the session)."""
    tag = uuid.uuid4().hex[:6]
    names = {"dora": f"dora{tag}", "eric": f"eric{tag}", "team": f"support{tag}"}
    slapd.add_user(names["dora"], "dora-pw", given="Dora", sn="Explorer", mail=f"{names['dora']}@example.org")
    slapd.add_user(names["eric"], "eric-pw", given="Eric", sn="Idle")
    slapd.set_group_members(names["team"], [names["dora"]])
    return names


def test_sign_in_maps_directory_groups_and_updates_the_user(slapd, people, settings, django_user_model):
    slapd.settings(settings, SSO_GROUP_RULES=f"{people['team']}=support-agents")
    user = authenticate(username=people["dora"], password="dora-pw")
    assert user is not None and user.username == people["dora"]
    assert (user.first_name, user.last_name, user.email) == ("Dora", "Explorer", f"{people['dora']}@example.org")
    assert set(user.groups.values_list("name", flat=True)) == {"support-agents"}
    assert not user.has_usable_password()
    assert ExternalIdentity.objects.get(user=user).subject == f"uid={people['dora']},ou=people,dc=example,dc=org"
    assert authenticate(username=people["dora"], password="wrong") is None
    assert authenticate(username="nobody-here", password="x") is None


def test_directory_groups_decide_access_and_removal_applies_at_next_sign_in(
        slapd, people, settings, kb_env, make_kb, load_docs, client):
    slapd.settings(settings, SSO_GROUP_RULES=f"{people['team']}=support-agents")
    machine = client.__class__()
    kb = make_kb("rota", owner=authenticate(username=people["eric"], password="eric-pw"),
                 groups=[Group.objects.create(name="support-agents")])
    load_docs(kb, {"rota.md": DOC})
    query = {"q": "how can I swap my support shift", "kb": "rota"}

    assert client.post("/accounts/login/", {"username": people["dora"], "password": "dora-pw"}).status_code == 302
    hits = client.get("/api/v1/search/", query)
    assert hits.status_code == 200 and "Swap a shift" in hits.json()["results"][0]["text"]
    key = client.post("/api/v1/api-keys/", {"name": "script"}, content_type="application/json").json()["key"]

    slapd.set_group_members(people["team"], [])  # the directory takes dora out of the team
    client.post("/accounts/logout/")
    assert client.post("/accounts/login/", {"username": people["dora"], "password": "dora-pw"}).status_code == 302
    assert client.get("/api/v1/search/", query).status_code == 404
    assert machine.get("/api/v1/search/", query, HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 404


def test_a_directory_entry_cannot_take_over_a_local_account(slapd, people, settings, django_user_model):
    slapd.settings(settings)
    local = django_user_model.objects.create_superuser(people["eric"], "eric@example.org", "local-pw")
    assert authenticate(username=people["eric"], password="eric-pw") is None
    local.refresh_from_db()
    assert local.is_superuser and local.has_usable_password()
    settings.LDAP_LINK_EXISTING_USERS = True  # an operator migrating local accounts opts in
    assert authenticate(username=people["eric"], password="eric-pw").pk == local.pk


def test_start_tls_with_the_directory_ca(slapd, people, settings):
    import ldap

    options = {ldap.OPT_REFERRALS: 0, ldap.OPT_NETWORK_TIMEOUT: 5,
               ldap.OPT_X_TLS_REQUIRE_CERT: ldap.OPT_X_TLS_DEMAND, ldap.OPT_X_TLS_CACERTFILE: str(slapd.ca_file),
               ldap.OPT_X_TLS_NEWCTX: 0}
    slapd.settings(settings, AUTH_LDAP_START_TLS=True)
    settings.AUTH_LDAP_CONNECTION_OPTIONS = options
    assert authenticate(username=people["dora"], password="dora-pw") is not None
    # Without the CA the server's certificate is not trusted: no sign-in (and no exception either).
    settings.AUTH_LDAP_CONNECTION_OPTIONS = {k: v for k, v in options.items() if k != ldap.OPT_X_TLS_CACERTFILE}
    settings.AUTH_LDAP_CONNECTION_OPTIONS[ldap.OPT_X_TLS_CACERTFILE] = "/etc/ssl/certs/ca-certificates.crt"
    assert authenticate(username=people["dora"], password="dora-pw") is None


def test_ldap_is_configured_by_environment(slapd):
    """settings.py turns LDAP_* variables into django-auth-ldap's settings (a fresh process)."""
    env = dict(os.environ, KOTAEMON_DEMO="1", LDAP_SERVER_URI=slapd.uri, LDAP_BIND_DN="cn=admin,dc=example,dc=org",
               LDAP_BIND_PASSWORD="pw", LDAP_USER_SEARCH_BASE="ou=people,dc=example,dc=org",
               LDAP_USER_FILTER="(sAMAccountName=%(user)s)", LDAP_GROUP_SEARCH_BASE="ou=groups,dc=example,dc=org",
               LDAP_GROUP_TYPE="nestedActiveDirectory", LDAP_START_TLS="1", LDAP_CA_CERT_FILE=str(slapd.ca_file),
               SSO_GROUP_RULES="support=agents")
    code = ("import django; django.setup(); from django.conf import settings as s; import ldap;"
            "print(s.AUTHENTICATION_BACKENDS[-1], s.AUTH_LDAP_USER_SEARCH.filterstr, type(s.AUTH_LDAP_GROUP_TYPE).__name__,"
            " s.AUTH_LDAP_START_TLS, s.AUTH_LDAP_CONNECTION_OPTIONS[ldap.OPT_X_TLS_CACERTFILE])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "DJANGO_SETTINGS_MODULE": "kotaemon_site.settings"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["apps.accounts.ldap.Backend", "(sAMAccountName=%(user)s)",
                                  "NestedActiveDirectoryGroupType", "True", str(slapd.ca_file)]
    bad = subprocess.run([sys.executable, "-c", "import django; django.setup()"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**env, "LDAP_GROUP_TYPE": "nonsense",
                                                       "DJANGO_SETTINGS_MODULE": "kotaemon_site.settings"})
    assert bad.returncode != 0 and "LDAP_GROUP_TYPE must be one of" in bad.stderr
