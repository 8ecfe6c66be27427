"""The outbound-URL gate against real local HTTP servers: internal addresses, redirects, sizes, time."""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from apps.core import outbound
from apps.core.outbound import OutboundError, address_problem, fetch


@contextmanager
def server(routes):
    """routes: path -> callable(handler) that writes the response."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            route = routes.get(self.path.split("?")[0])
            if route is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            route(self)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.hits = hits
    srv.url = f"http://127.0.0.1:{srv.server_port}"
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def body(data: bytes, status: int = 200, headers: dict | None = None):
    def write(h):
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    return write


def redirect(location: str, status: int = 302):
    return body(b"", status, {"Location": location})


@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"), ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"), ("fd12:3456::1", "unique-local"), ("100.64.0.1", "shared (carrier-grade NAT)"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("240.0.0.1", "reserved"), ("8.8.8.8", None), ("2606:4700:4700::1111", None),
])
def test_address_classification(address, reason):
    assert address_problem(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("url, code", [
    ("file:///etc/passwd", "scheme_not_allowed"), ("gopher://127.0.0.1:6379/_INFO", "scheme_not_allowed"),
    ("ftp://example.com/x", "scheme_not_allowed"), ("http:///nohost", "invalid_url"),
    ("http://user:pw@example.com/", "invalid_url"), ("http://127.0.0.1:99999/", "invalid_url"),
    ("http://127.0.0.1:6379/", "address_not_allowed"), ("http://localhost:5432/", "address_not_allowed"),
    ("http://169.254.169.254/latest/meta-data/", "address_not_allowed"), ("http://[::1]:8000/", "address_not_allowed"),
    ("http://0.0.0.0:8000/", "address_not_allowed"), ("http://no-such-host.invalid/", "dns_failed"),
])
def test_refused_before_any_connection(url, code):
    with pytest.raises(OutboundError) as err:
        fetch(url, timeout=3)
    assert err.value.code == code


def test_loopback_server_is_refused_unless_allowed_and_then_served():
    with server({"/doc": body(b"hello")}) as srv:
        with pytest.raises(OutboundError) as err:
            fetch(srv.url + "/doc")
        assert err.value.code == "address_not_allowed" and err.value.details["reason"] == "loopback"
        assert srv.hits == []  # refused before connecting
        resp = fetch(srv.url + "/doc", allow=[f"127.0.0.1:{srv.server_port}"])
        assert (resp.status, resp.content) == (200, b"hello")
        # CIDR entries work too; a port-qualified entry does not open other ports.
        assert fetch(srv.url + "/doc", allow=["127.0.0.0/8"]).content == b"hello"
        with pytest.raises(OutboundError):
            fetch(srv.url + "/doc", allow=["127.0.0.1:1"])


def test_the_allow_list_comes_from_settings(settings):
    with server({"/doc": body(b"configured")}) as srv:
        settings.OUTBOUND_ALLOWED_HOSTS = ["127.0.0.1"]
        assert fetch(srv.url + "/doc").content == b"configured"


def test_every_redirect_is_revalidated():
    with server({"/doc": body(b"internal secret")}) as internal:
        routes = {
            "/to-loopback": redirect(internal.url + "/doc"),
            "/to-metadata": redirect("http://169.254.169.254/latest/meta-data/iam/"),
            "/to-redis": redirect("http://localhost:6379/", 307),
            "/to-file": redirect("file:///etc/passwd", 301),
            "/loop": redirect("/loop"),
            "/fine": redirect("/final", 303),
            "/final": body(b"final"),
        }
        with server(routes) as public:
            allow = [f"127.0.0.1:{public.server_port}"]   # only the first server is "on premise"
            for path, code in [("/to-loopback", "address_not_allowed"), ("/to-metadata", "address_not_allowed"),
                               ("/to-redis", "address_not_allowed"), ("/to-file", "scheme_not_allowed"),
                               ("/loop", "too_many_redirects")]:
                with pytest.raises(OutboundError) as err:
                    fetch(public.url + path, allow=allow, max_redirects=3)
                assert err.value.code == code, path
            assert internal.hits == []
            resp = fetch(public.url + "/fine", method="POST", body=b"x", allow=allow)
            assert resp.content == b"final" and resp.redirects == [public.url + "/final"]


def test_metadata_addresses_are_refused_even_when_listed():
    with pytest.raises(OutboundError) as err:
        fetch("http://169.254.169.254/latest/", allow=["169.254.0.0/16", "169.254.169.254"], timeout=2)
    assert err.value.code == "address_not_allowed"


def test_host_filter_applies_to_every_hop():
    with server({"/final": body(b"ok")}) as other:
        with server({"/start": redirect(other.url + "/final")}) as first:
            allow = ["127.0.0.1"]
            seen = []

            def only_first(host, port):
                seen.append((host, port))
                return port == first.server_port

            with pytest.raises(OutboundError) as err:
                fetch(first.url + "/start", allow=allow, host_filter=only_first)
            assert err.value.code == "host_not_allowed" and other.hits == []
            assert seen == [("127.0.0.1", first.server_port), ("127.0.0.1", other.server_port)]


def test_credentials_do_not_follow_a_redirect_to_another_origin():
    got = {}

    def record(h):
        got["auth"] = h.headers.get("Authorization")
        body(b"ok")(h)

    with server({"/final": record}) as other:
        with server({"/start": redirect(other.url + "/final")}) as first:
            fetch(first.url + "/start", allow=["127.0.0.1"], headers={"Authorization": "Bearer s3cret"})
    assert got["auth"] is None


def test_size_limit():
    with server({"/big": body(b"x" * 5000)}) as srv:
        with pytest.raises(OutboundError) as err:
            fetch(srv.url + "/big", allow=["127.0.0.1"], max_bytes=1000)
        assert err.value.code == "response_too_large"
        assert len(fetch(srv.url + "/big", allow=["127.0.0.1"], max_bytes=5000).content) == 5000


def test_total_time_limit_holds_against_a_slow_drip():
    def drip(h):
        h.send_response(200)
        h.send_header("Content-Length", "100")
        h.end_headers()
        try:
            for _ in range(100):
                h.wfile.write(b"x")
                h.wfile.flush()
                time.sleep(0.05)   # every byte well within a per-read timeout, the whole far beyond the budget
        except OSError:
            pass  # the client gave up, as it should

    with server({"/drip": drip}) as srv:
        started = time.monotonic()
        with pytest.raises(OutboundError) as err:
            fetch(srv.url + "/drip", allow=["127.0.0.1"], timeout=0.6)
        assert err.value.code == "timeout"
        assert time.monotonic() - started < 2.0


def test_connects_to_the_checked_address_not_a_second_resolution(monkeypatch):
    """DNS rebinding: the name answers an allowed address to the check and an internal one afterwards."""
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1"] + ["10.66.66.66"] * 10)
    calls = []

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.test":
            calls.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(outbound.socket, "getaddrinfo", rebinding)
    with server({"/doc": body(b"from the checked address")}) as srv:
        resp = fetch(f"http://rebind.test:{srv.server_port}/doc", allow=["127.0.0.1/32"])
    assert resp.content == b"from the checked address" and calls == ["rebind.test"]


def test_every_resolved_address_must_pass(monkeypatch):
    real = socket.getaddrinfo

    def mixed(host, port, *args, **kwargs):
        if host == "mixed.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(outbound.socket, "getaddrinfo", mixed)
    with pytest.raises(OutboundError) as err:
        fetch("http://mixed.test/")
    assert err.value.code == "address_not_allowed" and err.value.details["address"] == "127.0.0.1"
