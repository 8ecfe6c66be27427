"""The cluster page of the admin console (/admin/cluster/): the same table as `manage.py cluster_status`.

There is no model behind it, so it is added to the default admin site's URLs and to its index rather
than registered as a ModelAdmin; admin_view() gives it the admin's staff-only login.
"""
from __future__ import annotations

import time

from django.contrib import admin
from django.http import JsonResponse
from django.template.response import TemplateResponse
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from .registry import instances_list


def cluster_rows() -> tuple[list[dict], str | None]:
    """Instance records for display, or ([], reason) when the registry cannot be read."""
    try:
        return instances_list(), None
    except Exception as exc:  # Redis down: the page says so instead of failing
        return [], _("The instance registry could not be read: %(error)s") % {"error": exc.__class__.__name__}


def cluster_status_view(request):
    rows, error = cluster_rows()
    if request.GET.get("format") == "json":
        return JsonResponse({"instances": rows, "error": error}, status=503 if error else 200)
    for row in rows:
        row["started_ago"] = round(time.time() - float(row.get("started") or time.time()))
        row["index_list"] = ", ".join(f"{k}: v{v}" for k, v in sorted((row.get("indexes") or {}).items())) \
            if isinstance(row.get("indexes"), dict) else row.get("indexes")
    context = {**admin.site.each_context(request), "title": _("Cluster instances"), "rows": rows, "error": error,
               "web_count": sum(1 for r in rows if r.get("kind") == "web"),
               "ready_count": sum(1 for r in rows if r.get("kind") == "web" and r.get("ready"))}
    return TemplateResponse(request, "admin/core/cluster_status.html", context)


def install(site: admin.AdminSite = admin.site) -> None:
    from .admin_site import admin_page_install

    admin_page_install(route="cluster/", view=cluster_status_view, url_name="cluster-status", section_label="cluster",
                       app_name=gettext_lazy("Cluster"), entry_name=gettext_lazy("Instances"), permission="cluster.view", site=site)
