"""One application error type and one JSON error format for every API error.

Every API error is {"error": {"code": str, "message": str, "details": dict}}. Codes are stable:
clients switch on them. Services raise ApplicationError; DRF and Django errors are mapped here.
Messages are for people and come in the request's language (gettext; LocaleMiddleware for HTTP, the
websocket consumer for its frames); the code never changes with the language.
"""
from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, JsonResponse
from django.utils.translation import gettext, gettext_lazy
from rest_framework import exceptions as drf_exceptions

logger = logging.getLogger(__name__)


class ApplicationError(Exception):
    """Raised by services for any expected failure; `code` is part of the API contract."""

    status_code = 400

    def __init__(self, code: str, message: str, *, details: dict[str, Any] | None = None, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}
        if status is not None:
            self.status_code = status


class NotFound(ApplicationError):
    status_code = 404

    def __init__(self, message: str | None = None, *, code: str = "not_found", details=None):
        super().__init__(code, message if message is not None else gettext("Not found."), details=details)


class PermissionDenied(ApplicationError):
    status_code = 403

    def __init__(self, message: str | None = None, *, code: str = "permission_denied", details=None):
        message = message if message is not None else gettext("You do not have permission to perform this action.")
        super().__init__(code, message, details=details)


_DRF_CODES: dict[type, str] = {
    drf_exceptions.ValidationError: "validation_error",
    drf_exceptions.ParseError: "parse_error",
    drf_exceptions.AuthenticationFailed: "authentication_failed",
    drf_exceptions.NotAuthenticated: "not_authenticated",
    drf_exceptions.PermissionDenied: "permission_denied",
    drf_exceptions.NotFound: "not_found",
    drf_exceptions.MethodNotAllowed: "method_not_allowed",
    drf_exceptions.NotAcceptable: "not_acceptable",
    drf_exceptions.UnsupportedMediaType: "unsupported_media_type",
    drf_exceptions.Throttled: "throttled",
}


def unavailable_dependency(exc: BaseException) -> str | None:
    """Name the backing service an exception says is down ("redis", "database"), or None.

    A dead dependency is an outage, not a bug: clients get 503 `service_unavailable` and may retry.
    """
    from django.db import InterfaceError, OperationalError

    try:
        from django_redis.exceptions import ConnectionInterrupted
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # pragma: no cover - both ship with the platform
        return None
    if isinstance(exc, (ConnectionInterrupted, RedisConnectionError, RedisTimeoutError)):
        return "redis"
    if isinstance(exc, (OperationalError, InterfaceError)):
        return "database"
    return None


def unavailable_body(dependency: str) -> dict[str, Any]:
    return error_body("service_unavailable", gettext("A backing service is unavailable; please retry shortly."),
                      {"dependency": dependency})


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    # str(): a lazy translation becomes text in the active language, and JSON encoders see a plain str.
    return {"error": {"code": code, "message": str(message), "details": details or {}}}


INVALID_REQUEST = gettext_lazy("The request is invalid; see details.")
SERVER_ERROR = gettext_lazy("An unexpected error occurred; it has been logged.")


def _drf_code(exc: drf_exceptions.APIException) -> str:
    for klass in type(exc).__mro__:
        if klass in _DRF_CODES:
            return _DRF_CODES[klass]
    code = exc.default_code if isinstance(exc.default_code, str) else "error"
    return code


def _message_for(exc: drf_exceptions.APIException) -> str:
    if isinstance(exc, drf_exceptions.ValidationError):
        return str(INVALID_REQUEST)
    detail = exc.detail
    if isinstance(detail, (list, tuple)) and detail:
        return str(detail[0])
    if isinstance(detail, dict):
        return str(INVALID_REQUEST)
    return str(detail)


def api_exception_handler(exc: Exception, context: dict):
    """DRF EXCEPTION_HANDLER: every exception becomes the JSON error format, never an HTML page."""
    # Imported here: rest_framework.views reads DRF settings, which import our authentication class,
    # which imports the services that import this module.
    from rest_framework.response import Response
    from rest_framework.views import set_rollback

    if isinstance(exc, Http404):
        exc = drf_exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf_exceptions.PermissionDenied()
    elif isinstance(exc, DjangoValidationError):
        exc = drf_exceptions.ValidationError(detail=exc.message_dict if hasattr(exc, "error_dict") else exc.messages)

    headers: dict[str, str] = {}
    if isinstance(exc, ApplicationError):
        body, status = error_body(exc.code, exc.message, exc.details), exc.status_code
    elif isinstance(exc, drf_exceptions.APIException):
        details: dict[str, Any] = {}
        if isinstance(exc, drf_exceptions.ValidationError):
            details = {"fields": exc.detail} if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        if isinstance(exc, drf_exceptions.Throttled) and exc.wait is not None:
            details["retry_after_seconds"] = int(exc.wait + 0.999)
            headers["Retry-After"] = str(details["retry_after_seconds"])
        if getattr(exc, "auth_header", None):
            headers["WWW-Authenticate"] = exc.auth_header
        body, status = error_body(_drf_code(exc), _message_for(exc), details), exc.status_code
    elif dependency := unavailable_dependency(exc):
        logger.error("Dependency unavailable in API view: %s", dependency, exc_info=exc)
        body, status = unavailable_body(dependency), 503
        headers["Retry-After"] = "5"
    else:
        logger.exception("Unhandled error in API view", extra={"view": str(context.get("view"))})
        body, status = error_body("server_error", SERVER_ERROR), 500
    set_rollback()
    return Response(body, status=status, headers=headers)


API_PATH_PREFIXES = ("/api/", "/v1/")  # the platform's API and the OpenAI-compatible one


def is_api_path(path: str) -> bool:
    return path.startswith(API_PATH_PREFIXES)


def _is_api_request(request: HttpRequest) -> bool:
    accept = request.headers.get("Accept", "")
    return is_api_path(request.path) or ("application/json" in accept and "text/html" not in accept)


def handler404(request: HttpRequest, exception: Exception | None = None):
    if _is_api_request(request):
        return JsonResponse(error_body("not_found", gettext("No such endpoint or object.")), status=404)
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


def handler500(request: HttpRequest):
    if _is_api_request(request):
        return JsonResponse(error_body("server_error", SERVER_ERROR), status=500)
    from django.views.defaults import server_error

    return server_error(request)
