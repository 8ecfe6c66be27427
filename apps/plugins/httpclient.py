"""The HTTP client handed to plugins (ctx.http), and the host allow-list matching the web process uses.

A sandboxed plugin has no network of its own (its worker runs in an empty network namespace). Its
requests travel over the worker's pipe as the platform call "http.request"; the web process checks
the plugin's `http` scope and its allow-list, then makes the request through the outbound gate
(apps/core/outbound.py: resolved addresses checked, every redirect re-validated, size and time
capped) and sends the response back. Django-free: the client half runs inside sandbox workers.
"""
from __future__ import annotations

import base64
import json as jsonlib
import urllib.parse
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


class HttpClient:
    """ctx.http: get/post/request(method, url, params=, json=, data=, headers=, timeout=) -> Response."""

    def __init__(self, rpc, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._rpc = rpc
        self.timeout = timeout

    def request(self, method: str, url: str, *, params: dict | None = None, json: Any = None,
                data: bytes | str | None = None, headers: dict[str, str] | None = None,
                timeout: float | None = None) -> Response:
        if params:
            url += ("&" if urllib.parse.urlsplit(url).query else "?") + urllib.parse.urlencode(params, doseq=True)
        headers = {str(k): str(v) for k, v in (headers or {}).items()}
        body: bytes | None = None
        if json is not None:
            body = jsonlib.dumps(json).encode()
            headers.setdefault("Content-Type", "application/json")
        elif data is not None:
            body = data.encode() if isinstance(data, str) else bytes(data)
        headers.setdefault("User-Agent", "kotaemon-site-plugin/1")
        reply = self._rpc("http.request", verb=str(method).upper(), url=str(url), headers=headers,
                          body=base64.b64encode(body).decode() if body is not None else None,
                          timeout=float(timeout or self.timeout))
        return Response(int(reply["status"]), dict(reply.get("headers") or {}),
                        base64.b64decode(reply.get("body") or ""), str(reply.get("url") or url))

    def get(self, url: str, **kwargs) -> Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs) -> Response:
        return self.request("POST", url, **kwargs)


__all__ = ["HttpClient", "Response", "PluginDenied", "PluginError", "host_allowed", "split_host_entry",
           "MAX_RESPONSE_BYTES"]
