"""Who may scrape metrics: the one rule for every metrics endpoint (web /metrics and the Celery
worker's WORKER_METRICS_PORT), and the worker's small HTTP server that applies it.

With METRICS_TOKEN set, only a scraper sending `Authorization: Bearer <token>` is answered; without one,
production settings (DEBUG off, so METRICS_PUBLIC off) deny every scrape; METRICS_PUBLIC=1 serves
openly (only for an endpoint the monitoring network alone can reach).
"""
from __future__ import annotations

import hmac
import json
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from socketserver import ThreadingMixIn

from django.conf import settings
from django.utils.translation import gettext_lazy as _

from apps.core.errors import error_body


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str

    def body(self) -> dict:
        return error_body(self.code, self.message)


def scrape_refusal(authorization: str | None) -> Refusal | None:
    """None when a scrape presenting this Authorization header may be answered."""
    token = getattr(settings, "METRICS_TOKEN", "") or ""
    if not token:
        if getattr(settings, "METRICS_PUBLIC", False):
            return None
        return Refusal(403, "metrics_token_not_configured",
                       _("Metrics are disabled until METRICS_TOKEN is set (or METRICS_PUBLIC=1)."))
    from apps.core.authentication import bearer_token

    offered = bearer_token(authorization) or ""
    if hmac.compare_digest(offered.encode(), token.encode()):
        return None
    return Refusal(401, "metrics_token_required", _("Send the metrics token as 'Authorization: Bearer <token>'."))


WWW_AUTHENTICATE = 'Bearer realm="metrics"'


def metrics_wsgi_app(registry):
    """prometheus_client's exposition app behind scrape_refusal."""
    from prometheus_client import make_wsgi_app

    inner = make_wsgi_app(registry)

    def app(environ, start_response):
        refusal = scrape_refusal(environ.get("HTTP_AUTHORIZATION"))
        if refusal is None:
            return inner(environ, start_response)
        headers = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
        if refusal.status == 401:
            headers.append(("WWW-Authenticate", WWW_AUTHENTICATE))
        start_response(f"{refusal.status} {'Unauthorized' if refusal.status == 401 else 'Forbidden'}", headers)
        return [json.dumps(refusal.body()).encode()]

    return app


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the access log would name every scrape; not needed
        pass


def serve_metrics(port: int, addr: str, registry) -> WSGIServer:
    """Serve `registry` on addr:port in a daemon thread (the worker's endpoint); returns the server."""
    server = make_server(addr, port, metrics_wsgi_app(registry), server_class=_ThreadingServer,
                         handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
