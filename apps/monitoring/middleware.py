from __future__ import annotations

import time

from .metrics import http_request_duration_seconds, http_requests_total


def _route(request) -> str:
    match = getattr(request, "resolver_match", None)
    if match is None:
        return "unmatched"
    return "/" + (match.route or match.view_name or "unknown").lstrip("^")


class PrometheusMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        start = time.perf_counter()
        response = self.get_response(request)
        route = _route(request)
        if route != "/metrics":
            http_requests_total.labels(request.method, route, str(response.status_code)).inc()
            http_request_duration_seconds.labels(request.method, route).observe(time.perf_counter() - start)
        return response
