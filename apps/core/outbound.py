"""Every outbound HTTP request the platform makes on someone else's behalf goes through here.

Used by the document source-URL fetch (apps.knowledge), by plugins' HTTP client (served by the web
process over the sandbox pipe, apps.plugins.services) and by any future connector. One gate, so an
attacker who controls a URL (a document's source, a plugin's config, a plugin itself) cannot reach
the platform's own network: Redis, PostgreSQL, the cloud metadata service, other internal hosts.

What it enforces, on the first request and again on every redirect:
- scheme http or https only;
- the host is resolved once, and EVERY resolved address must be public: loopback, private (RFC 1918),
  carrier-grade NAT, link-local, unique-local, multicast, unspecified and reserved ranges are refused,
  and the cloud metadata addresses (169.254.169.254, fd00:ec2::254) always are;
- the connection goes to the address that was checked (the Host header and TLS name stay the host
  name), so a DNS answer that changes between check and connect ("rebinding") gains nothing;
- operators allow on-premise hosts with OUTBOUND_ALLOWED_HOSTS (names, *.domain, IPs, CIDRs, each
  optionally with :port);
- a caller-supplied host filter (a plugin's allow-list) is applied to every hop too;
- response size and total time are capped.

Failures raise OutboundError with a stable code (see CODES).
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Iterable

from django.conf import settings

from .errors import ApplicationError

CODES = {
    "invalid_url": "the URL cannot be parsed or has no host",
    "scheme_not_allowed": "only http and https URLs may be fetched",
    "host_not_allowed": "the caller's allow-list does not contain this host",
    "address_not_allowed": "the host resolves to an internal or reserved address",
    "dns_failed": "the host name does not resolve",
    "connect_failed": "no connection could be made",
    "tls_failed": "the TLS handshake or certificate check failed",
    "timeout": "the request did not finish in time",
    "too_many_redirects": "the redirect limit was reached",
    "response_too_large": "the response exceeds the size limit",
    "bad_response": "the server did not speak HTTP",
}
# Retrying may help with these; the others are decisions or permanent problems.
TRANSIENT_CODES = frozenset({"dns_failed", "connect_failed", "timeout", "tls_failed", "bad_response"})
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_REDIRECTS = (301, 302, 303, 307, 308)
_ORIGIN_HEADERS = ("authorization", "cookie", "proxy-authorization")


class OutboundError(ApplicationError):
    def __init__(self, code: str, message: str, *, details: dict | None = None) -> None:
        super().__init__(code, message, details=details)

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT_CODES


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    content: bytes
    url: str                                  # after redirects
    redirects: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Allow:
    host: str | None = None                   # exact name or "*.domain"
    network: ipaddress._BaseNetwork | None = None
    port: int | None = None


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, port = entry.split(":")
        if port.isdigit():
            return host, int(port)
    return entry, None


def parse_allow_list(entries: Iterable[str]) -> tuple[_Allow, ...]:
    """'intranet.example.com', '*.corp.example', '10.1.2.3', '10.0.0.0/8', 'hr.local:8443', '[fd12::1]:80'."""
    out = []
    for raw in entries:
        entry = raw.strip().lower().rstrip(".")
        if not entry:
            continue
        host, port = _split_port(entry)
        try:
            out.append(_Allow(network=ipaddress.ip_network(host, strict=False), port=port))
        except ValueError:
            out.append(_Allow(host=host, port=port))
    return tuple(out)


def address_problem(ip: ipaddress._BaseAddress) -> str | None:
    """Why an address must not be fetched from, or None when it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return "cloud metadata"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv6Address) and ip in ipaddress.ip_network("fc00::/7"):
        return "unique-local"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "shared (carrier-grade NAT)"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "reserved"
    return None


def _host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and host != pattern[2:]
    return host == pattern


def _allowed_internal(host: str, port: int, ip: ipaddress._BaseAddress, allow: tuple[_Allow, ...]) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return False  # never, whatever the allow-list says
    for entry in allow:
        if entry.port is not None and entry.port != port:
            continue
        if entry.network is not None and ip.version == entry.network.version and ip in entry.network:
            return True
        if entry.host is not None and _host_matches(entry.host, host):
            return True
    return False


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str           # as written in the URL (lower case, no brackets)
    port: int
    path: str           # path + query, what goes on the request line
    addresses: tuple[str, ...]


def _parse(url: str) -> tuple[str, str, int, str]:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise OutboundError("invalid_url", f"The URL is invalid: {exc}.") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise OutboundError("scheme_not_allowed", f"Only http and https URLs may be fetched, not {scheme or 'none'!r}.")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise OutboundError("invalid_url", "The URL has no host.")
    if parts.username or parts.password:
        raise OutboundError("invalid_url", "URLs with credentials in them are not fetched.")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host.lower(), port or (443 if scheme == "https" else 80), path


def check_url(url: str, *, host_filter: Callable[[str, int], bool] | None = None,
              allow: Iterable[str] | None = None) -> Target:
    """Validate a URL and resolve its host once; raises OutboundError. `allow` defaults to OUTBOUND_ALLOWED_HOSTS."""
    scheme, host, port, path = _parse(url)
    if host_filter is not None and not host_filter(host, port):
        raise OutboundError("host_not_allowed", f"Host {host}:{port} is not in the allowed hosts.")
    allow_list = parse_allow_list(settings.OUTBOUND_ALLOWED_HOSTS if allow is None else allow)
    try:
        literal = ipaddress.ip_address(host)
        addresses = [str(literal)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise OutboundError("dns_failed", f"{host} could not be resolved: {exc}.") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise OutboundError("dns_failed", f"{host} has no addresses.")
    for raw in addresses:
        ip = ipaddress.ip_address(raw.split("%")[0])
        problem = address_problem(ip)
        if problem and not _allowed_internal(host, port, ip, allow_list):
            # Every address must pass: a name with one public and one internal answer is refused.
            raise OutboundError("address_not_allowed", f"{host} resolves to {ip}, a {problem} address; "
                                                       "internal hosts must be listed in OUTBOUND_ALLOWED_HOSTS.",
                                details={"host": host, "address": str(ip), "reason": problem})
    return Target(scheme, host, port, path, tuple(addresses))


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the address that was checked, never re-resolving the name."""

    def __init__(self, target: Target, address: str, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, target: Target, address: str, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _remaining(deadline: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise OutboundError("timeout", f"{url} did not answer within the time limit.")
    return left


def _one_request(target: Target, url: str, method: str, headers: dict[str, str], body: bytes | None,
                 deadline: float, max_bytes: int) -> tuple[int, dict[str, str], bytes]:
    last_error: OutboundError | None = None
    for address in target.addresses:
        cls = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
        conn = cls(target, address, _remaining(deadline, url))
        try:
            try:
                conn.connect()
            except ssl.SSLError as exc:
                raise OutboundError("tls_failed", f"TLS with {target.host} failed: {exc}.") from None
            except (socket.timeout, TimeoutError):
                last_error = OutboundError("timeout", f"{url} did not accept a connection in time.")
                continue
            except OSError as exc:
                last_error = OutboundError("connect_failed", f"{url} could not be reached: {exc}.")
                continue
            try:
                sock = conn.sock  # getresponse() may hand the socket to the response and clear conn.sock
                conn.request(method, target.path, body=body, headers=headers)
                sock.settimeout(_remaining(deadline, url))
                resp = conn.getresponse()
                chunks, total = [], 0
                while True:
                    sock.settimeout(_remaining(deadline, url))
                    block = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
                    if not block:
                        break
                    total += len(block)
                    if total > max_bytes:
                        raise OutboundError("response_too_large", f"{url} returned more than {max_bytes} bytes.",
                                            details={"limit": max_bytes})
                    chunks.append(block)
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, b"".join(chunks)
            except (socket.timeout, TimeoutError):
                raise OutboundError("timeout", f"{url} did not answer within the time limit.") from None
            except ssl.SSLError as exc:
                raise OutboundError("tls_failed", f"TLS with {target.host} failed: {exc}.") from None
            except (http.client.HTTPException, ValueError) as exc:
                raise OutboundError("bad_response", f"{url} sent an invalid HTTP response: {exc}.") from None
            except OSError as exc:
                raise OutboundError("connect_failed", f"{url} dropped the connection: {exc}.") from None
        finally:
            conn.close()
    raise last_error or OutboundError("connect_failed", f"{url} could not be reached.")


def fetch(url: str, *, method: str = "GET", headers: dict[str, str] | None = None, body: bytes | None = None,
          timeout: float | None = None, max_bytes: int | None = None, max_redirects: int | None = None,
          host_filter: Callable[[str, int], bool] | None = None, allow: Iterable[str] | None = None) -> Response:
    """One HTTP exchange through the gate (redirects followed, each hop checked). Raises OutboundError.

    `timeout` bounds the whole exchange, redirects included. `host_filter(host, port)` is the caller's own
    allow-list (e.g. a plugin's); `allow` overrides OUTBOUND_ALLOWED_HOSTS (for tests and connectors).
    HTTP error statuses are returned, not raised.
    """
    timeout = settings.OUTBOUND_TIMEOUT_SECONDS if timeout is None else timeout
    max_bytes = settings.OUTBOUND_MAX_BYTES if max_bytes is None else max_bytes
    max_redirects = settings.OUTBOUND_MAX_REDIRECTS if max_redirects is None else max_redirects
    deadline = time.monotonic() + timeout
    method = method.upper()
    headers = {str(k): str(v) for k, v in (headers or {}).items()}
    if not any(k.lower() == "user-agent" for k in headers):
        headers["User-Agent"] = "kotaemon-site/1.0"
    redirects: list[str] = []
    current = url
    while True:
        target = check_url(current, host_filter=host_filter, allow=allow)
        status, resp_headers, content = _one_request(target, current, method, headers, body, deadline, max_bytes)
        location = resp_headers.get("location")
        if status not in _REDIRECTS or not location:
            return Response(status, resp_headers, content, current, redirects)
        if len(redirects) >= max_redirects:
            raise OutboundError("too_many_redirects", f"{url} redirected more than {max_redirects} times.")
        nxt = urllib.parse.urljoin(current, location)
        if status == 303 or (status in (301, 302) and method == "POST"):
            method, body = ("HEAD" if method == "HEAD" else "GET"), None
            headers = {k: v for k, v in headers.items() if k.lower() not in ("content-type", "content-length")}
        if urllib.parse.urlsplit(nxt)[:2] != urllib.parse.urlsplit(current)[:2]:
            # Credentials meant for one origin never follow a redirect to another.
            headers = {k: v for k, v in headers.items() if k.lower() not in _ORIGIN_HEADERS}
        redirects.append(nxt)
        current = nxt
