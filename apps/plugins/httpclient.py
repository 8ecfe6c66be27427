"""The HTTP client handed to plugins (ctx.http). Django-free: it runs inside sandbox workers.

Only hosts on the plugin's allow-list can be reached, including after redirects; anything else
raises PluginDenied before a socket is opened. The worker's audit hook (worker.py) is the backstop
for plugins that bypass this client and open sockets themselves.
"""
from __future__ import annotations

import json as jsonlib
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Iterable

from .base import PluginDenied, PluginError

MAX_RESPONSE_BYTES = 2 * 1024 * 1024
DEFAULT_TIMEOUT = 5.0


def split_host_entry(entry: str) -> tuple[str, int | None]:
    """'api.example.com', '*.example.com', '127.0.0.1:8080', '[::1]:9000' -> (host, port or None)."""
    entry = entry.strip().lower()
    if "://" in entry:
        parsed = urllib.parse.urlsplit(entry)
        return (parsed.hostname or ""), parsed.port
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, int(port) if port.isdigit() else None
    return entry, None


def host_allowed(host: str, port: int | None, allowed: Iterable[str]) -> bool:
    host = (host or "").lower().rstrip(".")
    if not host:
        return False
    for entry in allowed:
        a_host, a_port = split_host_entry(entry)
        if a_port is not None and port != a_port:
            continue
        if a_host.startswith("*."):
            if host.endswith(a_host[1:]) and host != a_host[2:]:
                return True
        elif host == a_host:
            return True
    return False


def url_host_port(url: str) -> tuple[str, int | None, str]:
    parsed = urllib.parse.urlsplit(url)
    scheme = parsed.scheme.lower()
    try:
        port = parsed.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        port = None
    return (parsed.hostname or ""), port, scheme


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, url: str) -> None:
        self.status = status
        self.headers = headers
        self.content = body
        self.url = url

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 400

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        try:
            return jsonlib.loads(self.content)
        except ValueError as exc:
            raise PluginError("http_bad_json", f"{self.url} did not return JSON: {exc}") from None

    def raise_for_status(self) -> None:
        if not self.ok:
            raise PluginError("http_status", f"{self.url} answered HTTP {self.status}")


class _GuardedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, client: "HttpClient") -> None:
        self.client = client

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.client.check_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class HttpClient:
    def __init__(self, allowed_hosts: Iterable[str], *, enabled: bool = True, timeout: float = DEFAULT_TIMEOUT,
                 on_denied=None) -> None:
        self.allowed_hosts = [h for h in allowed_hosts if h]
        self.enabled = enabled
        self.timeout = timeout
        self._on_denied = on_denied
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _GuardedRedirects(self))

    def _deny(self, code: str, message: str) -> PluginDenied:
        if self._on_denied:
            self._on_denied(code, message)
        return PluginDenied(code, message)

    def check_url(self, url: str) -> None:
        if not self.enabled:
            raise self._deny("scope_missing", "this plugin does not declare the 'http' scope")
        host, port, scheme = url_host_port(url)
        if scheme not in ("http", "https"):
            raise self._deny("scheme_not_allowed", f"only http and https URLs may be fetched, not {scheme!r}")
        if not host_allowed(host, port, self.allowed_hosts):
            raise self._deny("host_not_allowed", f"host {host!r} is not in this plugin's allowed hosts")

    def request(self, method: str, url: str, *, params: dict | None = None, json: Any = None,
                data: bytes | str | None = None, headers: dict[str, str] | None = None,
                timeout: float | None = None) -> Response:
        if params:
            url += ("&" if urllib.parse.urlsplit(url).query else "?") + urllib.parse.urlencode(params, doseq=True)
        self.check_url(url)
        headers = {str(k): str(v) for k, v in (headers or {}).items()}
        body: bytes | None = None
        if json is not None:
            body = jsonlib.dumps(json).encode()
            headers.setdefault("Content-Type", "application/json")
        elif data is not None:
            body = data.encode() if isinstance(data, str) else data
        headers.setdefault("User-Agent", "kotaemon-site-plugin/1")
        req = urllib.request.Request(url, data=body, headers=headers, method=method.upper())
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                payload = resp.read(MAX_RESPONSE_BYTES + 1)
                status, resp_headers, final_url = resp.status, dict(resp.headers.items()), resp.url
        except urllib.error.HTTPError as exc:
            payload = exc.read(MAX_RESPONSE_BYTES + 1) if exc.fp else b""
            status, resp_headers, final_url = exc.code, dict(exc.headers.items()) if exc.headers else {}, url
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, PluginDenied):
                raise reason from None
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise PluginError("http_timeout", f"{url} did not answer in time") from None
            raise PluginError("http_unreachable", f"{url} could not be reached: {reason}") from None
        except (socket.timeout, TimeoutError):
            raise PluginError("http_timeout", f"{url} did not answer in time") from None
        if len(payload) > MAX_RESPONSE_BYTES:
            raise PluginError("http_response_too_large", f"{url} returned more than {MAX_RESPONSE_BYTES} bytes")
        return Response(status, resp_headers, payload, final_url)

    def get(self, url: str, **kwargs) -> Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs) -> Response:
        return self.request("POST", url, **kwargs)
