from django.http import HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from .checks import run_checks
from .metrics import CONTENT_TYPE_LATEST, render
from .scrape import WWW_AUTHENTICATE, scrape_refusal


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
    """Prometheus exposition, behind the one scrape rule (apps/monitoring/scrape.py)."""
    refusal = scrape_refusal(request.headers.get("Authorization"))
    if refusal is not None:
        response = JsonResponse(refusal.body(), status=refusal.status)
        if refusal.status == 401:
            response["WWW-Authenticate"] = WWW_AUTHENTICATE
        return response
    return HttpResponse(render(), content_type=CONTENT_TYPE_LATEST)
