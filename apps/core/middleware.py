from __future__ import annotations

import logging
import re
import time
import uuid

from django.http import HttpRequest, HttpResponse, JsonResponse

from .errors import SERVER_ERROR, error_body, is_api_path, unavailable_body, unavailable_dependency
from .logging import current_request_var, request_id_var, session_id_var

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("kotaemon.access")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SESSION_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Probes and scrapes arrive every few seconds; an access line for each would drown the rest.
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def _session_id_from(request: HttpRequest, view_kwargs: dict | None = None) -> str | None:
    """The conversation session a request is about, when it says so (URL, header or query)."""
    for candidate in (
        (view_kwargs or {}).get("session_id"),
        request.headers.get("X-Session-ID"),
        request.GET.get("session_id"),
    ):
        if candidate is not None and _SESSION_ID_RE.match(str(candidate)):
            return str(candidate)
    return None


class RequestContextMiddleware:
    """Gives every request an id (honouring a sane incoming X-Request-ID) for logs and the response,
    binds the session id when the request names one, and writes one access line per request."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        incoming = request.headers.get("X-Request-ID", "")
        request.request_id = incoming if _REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        start = time.perf_counter()
        tokens = [
            (request_id_var, request_id_var.set(request.request_id)),
            (session_id_var, session_id_var.set(_session_id_from(request) or "-")),
            (current_request_var, current_request_var.set(request)),
        ]
        try:
            response = self.get_response(request)
            response["X-Request-ID"] = request.request_id
            if request.path not in _QUIET_PATHS:
                user = getattr(request, "user", None)
                access_logger.info(
                    "%s %s %s", request.method, request.get_full_path(), response.status_code,
                    extra={"method": request.method, "status": response.status_code,
                           "duration_ms": round((time.perf_counter() - start) * 1000, 1),
                           "user_id": getattr(user, "pk", None) if getattr(user, "is_authenticated", False) else None},
                )
        finally:
            for var, token in reversed(tokens):
                var.reset(token)
        return response

    def process_view(self, request: HttpRequest, view_func, view_args, view_kwargs):
        session_id = _session_id_from(request, view_kwargs)
        if session_id:
            session_id_var.set(session_id)
        return None


class ApiErrorMiddleware:
    """An exception escaping an API view becomes the JSON error format, even with DEBUG on."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception):
        if not is_api_path(request.path):
            return None
        if dependency := unavailable_dependency(exception):
            logger.error("Dependency unavailable: %s", dependency, exc_info=exception)
            response = JsonResponse(unavailable_body(dependency), status=503)
            response["Retry-After"] = "5"
            return response
        logger.exception("Unhandled error in %s %s", request.method, request.path)
        return JsonResponse(error_body("server_error", SERVER_ERROR), status=500)
