"""The operations dashboard page of the admin console (/admin/dashboard/), staff only.

There is no model behind it, so it is added to the default admin site's URLs and index (as the
cluster page is, apps/core/cluster_admin.py); admin_view() gives it the admin's staff-only login.
"""
from __future__ import annotations

from django.contrib import admin
from django.template.response import TemplateResponse
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from apps.core.errors import ApplicationError

from . import charts
from .dashboard import dashboard_build

PERIODS = (7, 30, 90)


def dashboard_view(request):
    try:
        board = dashboard_build(user=request.user, days=request.GET.get("days"))
    except ApplicationError as exc:
        context = {**admin.site.each_context(request), "title": _("Operations dashboard"), "error": exc.message,
                   "periods": PERIODS}
        return TemplateResponse(request, "monitoring/dashboard.html", context, status=exc.status_code)
    labels = board.day_labels
    green, red, blue, orange = "#5b9a68", "#c0392b", charts.PALETTE[0], charts.PALETTE[1]
    chart = {
        "answers": charts.stacked_bar_chart(labels, [
            (_("answered with sources"), blue, [a - u for a, u in zip(board.answers, board.unanswered_per_day)]),
            (_("no relevant source"), orange, board.unanswered_per_day),
        ], title=_("Answers per day")),
        "feedback": charts.stacked_bar_chart(labels, [
            (_("helpful"), green, board.feedback_up), (_("not helpful"), red, board.feedback_down),
        ], title=_("Feedback per day")),
        "latency": charts.line_chart(labels, [
            ("p50", blue, board.latency_p50), ("p95", red, board.latency_p95),
        ], title=_("Answer latency per day (ms)"), unit=" ms"),
        "tokens": charts.stacked_bar_chart(labels, [
            (_("prompt"), blue, board.prompt_tokens), (_("completion"), orange, board.completion_tokens),
        ], title=_("Tokens per day")),
        "retrieval": charts.stacked_bar_chart([r["mode"] for r in board.retrieval], [
            ("p50", blue, [r["p50_ms"] for r in board.retrieval]),
            ("p95 - p50", "#9cc3d5", [max(0.0, r["p95_ms"] - r["p50_ms"]) for r in board.retrieval]),
        ], title=_("Retrieval latency by mode (ms), this instance"), unit=" ms", height=200),
        "plugins": charts.rate_bars([(p["plugin"], p["rate"], f"{p['failures']}/{p['calls']}") for p in board.plugins],
                                    title=_("Plugin failure rate"), good_high=False),
        "session": charts.rate_bars([(s["tier"], s["rate"], f"{s['hits']}/{s['hits'] + s['misses']}")
                                     for s in board.session_store], title=_("Session store hit rate by tier")),
    }
    totals = board.totals
    if totals["feedback_up_rate"] is not None:
        chart["feedback_rate"] = charts.rate_bars([
            (_("helpful"), totals["feedback_up_rate"], _("%(n)d up") % {"n": totals["feedback_up"]}),
            (_("not helpful"), 1 - totals["feedback_up_rate"], _("%(n)d down") % {"n": totals["feedback_down"]}),
        ], title=_("Feedback up/down rate"))
    context = {**admin.site.each_context(request), "title": _("Operations dashboard"), "board": board,
               "totals": totals, "chart": chart, "periods": PERIODS}
    return TemplateResponse(request, "monitoring/dashboard.html", context)


def install(site: admin.AdminSite = admin.site) -> None:
    from apps.core.admin_site import admin_page_install

    admin_page_install(route="dashboard/", view=dashboard_view, url_name="operations-dashboard",
                       section_label="operations", app_name=gettext_lazy("Operations"),
                       entry_name=gettext_lazy("Dashboard"), permission="dashboard.view", first=True, site=site)
