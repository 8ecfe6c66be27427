import hmac

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from apps.core.errors import error_body

from .checks import run_checks
from .metrics import CONTENT_TYPE_LATEST, render


@never_cache
@require_GET
def healthz(request):
    """Liveness: the process answers. Dependencies are /readyz's business."""
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def readyz(request):
    checks = run_checks()
    failing = sorted(name for name, result in checks.items() if not result["ok"])
    body = {"status": "fail" if failing else "ok", "failing": failing, "checks": checks}
    return JsonResponse(body, status=503 if failing else 200)


@never_cache
@require_GET
def metrics(request):
    """Prometheus exposition. With METRICS_TOKEN set, only scrapers presenting it are answered; without one,
    production (DEBUG off) denies every scrape unless METRICS_PUBLIC says the network already restricts it."""
    token = getattr(settings, "METRICS_TOKEN", "")
    if not token and not getattr(settings, "METRICS_PUBLIC", False):
        return JsonResponse(error_body("metrics_token_not_configured",
                                       "Metrics are disabled until METRICS_TOKEN is set (or METRICS_PUBLIC=1)."),
                            status=403)
    if token:
        from apps.core.authentication import bearer_token

        offered = bearer_token(request.headers.get("Authorization")) or ""
        if not hmac.compare_digest(offered.encode(), token.encode()):
            response = JsonResponse(error_body("metrics_token_required",
                                               "Send the metrics token as 'Authorization: Bearer <token>'."),
                                    status=401)
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    return HttpResponse(render(), content_type=CONTENT_TYPE_LATEST)
