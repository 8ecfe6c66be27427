"""Real identity servers for the sign-in tests: OpenLDAP's slapd and an OpenID provider on Node.js.

Both are started by the tests on free ports and seeded with users and groups; nothing is mocked.
`make test` (system-deps) installs slapd and the provider's npm packages; a missing one fails the
test with the command to run, it never skips.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import free_port, stop_process, wait_for_port
from tests.knowledge.conftest import embedding_model, kb_env, load_docs, make_kb  # noqa: F401 (fixtures)

IDP_DIR = Path(__file__).resolve().parent / "idp"
BASE_DN = "dc=example,dc=org"
ROOT_DN = f"cn=admin,{BASE_DN}"
ROOT_PW = "ldap-root-secret"
SLAPD = "/usr/sbin/slapd"


def _tls_files(directory: Path) -> dict[str, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (StartTLS tests)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kotaemon test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return files


class Directory:
    """A running slapd seeded with people and groups, and ways to change them."""

    def __init__(self, uri: str, ca_file: Path):
        self.uri, self.ca_file = uri, ca_file

    def _conn(self):
        import ldap

        conn = ldap.initialize(self.uri)
        conn.simple_bind_s(ROOT_DN, ROOT_PW)
        return conn

    def add_user(self, uid: str, password: str, *, given: str = "", sn: str = "User", mail: str = "") -> str:
        dn = f"uid={uid},ou=people,{BASE_DN}"
        attrs = [("objectClass", [b"inetOrgPerson"]), ("uid", [uid.encode()]), ("cn", [uid.encode()]),
                 ("sn", [sn.encode()]), ("userPassword", [password.encode()])]
        if given:
            attrs.append(("givenName", [given.encode()]))
        if mail:
            attrs.append(("mail", [mail.encode()]))
        self._conn().add_s(dn, attrs)
        return dn

    def set_group_members(self, cn: str, uids: list[str]) -> None:
        import ldap

        dn = f"cn={cn},ou=groups,{BASE_DN}"
        # groupOfNames needs at least one member: the root DN stands in for "nobody".
        members = [f"uid={u},ou=people,{BASE_DN}".encode() for u in uids] or [ROOT_DN.encode()]
        conn = self._conn()
        try:
            conn.add_s(dn, [("objectClass", [b"groupOfNames"]), ("cn", [cn.encode()]), ("member", members)])
        except ldap.ALREADY_EXISTS:
            conn.modify_s(dn, [(ldap.MOD_REPLACE, "member", members)])

    def settings(self, settings, **extra) -> None:
        """Point django-auth-ldap at this directory (what LDAP_* variables do in settings.py)."""
        import ldap
        from django_auth_ldap.config import GroupOfNamesType, LDAPSearch

        settings.AUTH_LDAP_SERVER_URI = self.uri
        settings.AUTH_LDAP_BIND_DN = ROOT_DN
        settings.AUTH_LDAP_BIND_PASSWORD = ROOT_PW
        settings.AUTH_LDAP_USER_SEARCH = LDAPSearch(f"ou=people,{BASE_DN}", ldap.SCOPE_SUBTREE, "(uid=%(user)s)")
        settings.AUTH_LDAP_GROUP_SEARCH = LDAPSearch(f"ou=groups,{BASE_DN}", ldap.SCOPE_SUBTREE,
                                                     "(objectClass=groupOfNames)")
        settings.AUTH_LDAP_GROUP_TYPE = GroupOfNamesType()
        settings.AUTH_LDAP_CONNECTION_OPTIONS = {ldap.OPT_REFERRALS: 0, ldap.OPT_NETWORK_TIMEOUT: 5}
        settings.AUTHENTICATION_BACKENDS = ["apps.accounts.backends.PasswordBackend", "apps.accounts.ldap.Backend"]
        for name, value in extra.items():
            setattr(settings, name, value)


@pytest.fixture(scope="session")
def slapd(tmp_path_factory):
    if not os.path.exists(SLAPD):
        pytest.fail("OpenLDAP's slapd is missing: `apt-get install slapd ldap-utils` (make system-deps does it)")
    import ldap

    root = tmp_path_factory.mktemp("slapd")
    (root / "data").mkdir()
    tls = _tls_files(root)
    port = free_port()
    conf = root / "slapd.conf"
    conf.write_text(f"""
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {root}/slapd.pid
TLSCACertificateFile {tls['ca']}
TLSCertificateFile {tls['cert']}
TLSCertificateKeyFile {tls['key']}
database mdb
maxsize 10485760
suffix "{BASE_DN}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PW}
directory {root}/data
""")
    log = open(root / "slapd.log", "w")
    proc = subprocess.Popen([SLAPD, "-f", str(conf), "-h", f"ldap://127.0.0.1:{port}/", "-d", "0"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=30, proc=proc)
        uri = f"ldap://127.0.0.1:{port}"
        conn = ldap.initialize(uri)
        for _ in range(50):
            try:
                conn.simple_bind_s(ROOT_DN, ROOT_PW)
                break
            except ldap.SERVER_DOWN:
                time.sleep(0.1)
        conn.add_s(BASE_DN, [("objectClass", [b"dcObject", b"organization"]), ("dc", [b"example"]),
                             ("o", [b"Example"])])
        for ou in ("people", "groups"):
            conn.add_s(f"ou={ou},{BASE_DN}", [("objectClass", [b"organizationalUnit"]), ("ou", [ou.encode()])])
        yield Directory(uri, tls["ca"])
    finally:
        stop_process(proc)
        log.close()


class IdentityProvider:
    """A running OpenID provider; ``users`` is its user store, re-read at every sign-in."""

    client_id = "kotaemon-test"
    client_secret = "kotaemon-test-secret-0123456789"

    def __init__(self, issuer: str, users_file: Path):
        self.issuer, self.users_file = issuer, users_file

    def set_users(self, users: dict) -> None:
        self.users_file.write_text(json.dumps(users))

    def settings(self, settings, **extra) -> None:
        from apps.accounts import oidc

        oidc.clear_discovery_cache()
        settings.OIDC_ISSUER = self.issuer
        settings.OIDC_RP_CLIENT_ID = self.client_id
        settings.OIDC_RP_CLIENT_SECRET = self.client_secret
        settings.OIDC_RP_SCOPES = "openid email profile groups"
        settings.AUTHENTICATION_BACKENDS = ["apps.accounts.backends.PasswordBackend", "apps.accounts.oidc.Backend"]
        for name, value in extra.items():
            setattr(settings, name, value)


def redirect_uris(*bases: str) -> str:
    return ",".join(f"{base}/oidc/callback/" for base in bases)


@pytest.fixture(scope="session")
def idp_process(tmp_path_factory):
    """The provider process, shared by the session; registered redirect URIs: the test client's and
    those of live servers on ports reserved here (``live_ports``)."""
    node = shutil.which("node")
    if not node:
        pytest.fail("Node.js is missing: the OpenID provider of the sign-in tests runs on it")
    if not (IDP_DIR / "node_modules" / "oidc-provider").exists():
        pytest.fail(f"the OpenID provider's packages are missing: run `npm ci` in {IDP_DIR} (make system-deps does it)")
    root = tmp_path_factory.mktemp("idp")
    users = root / "users.json"
    users.write_text("{}")
    port = free_port()
    live_ports = [free_port() for _ in range(2)]
    bases = ["http://testserver"] + [f"http://127.0.0.1:{p}" for p in live_ports]
    env = dict(os.environ, IDP_PORT=str(port), IDP_CLIENT_ID=IdentityProvider.client_id,
               IDP_CLIENT_SECRET=IdentityProvider.client_secret, IDP_REDIRECT_URI=redirect_uris(*bases),
               IDP_POST_LOGOUT_REDIRECT_URI=",".join(f"{b}/accounts/login/" for b in bases), IDP_USERS=str(users))
    log = open(root / "idp.log", "w")
    proc = subprocess.Popen([node, str(IDP_DIR / "server.mjs")], cwd=IDP_DIR, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=30, proc=proc)
        provider = IdentityProvider(f"http://127.0.0.1:{port}", users)
        provider.live_ports = live_ports
        provider.log_path = root / "idp.log"
        yield provider
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture
def client_factory():
    """Separate browsers (each its own session)."""
    from django.test import Client

    return Client


@pytest.fixture
def idp(idp_process, settings):
    idp_process.set_users({})
    idp_process.settings(settings)
    return idp_process
