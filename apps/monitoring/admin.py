from __future__ import annotations

import json

from django.contrib import admin
from django.http import StreamingHttpResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext_lazy as _

from apps.core import authz

from .models import AuditEvent
from .selectors import audit_events_csv


class ActorFilter(admin.SimpleListFilter):
    title = _("actor")
    parameter_name = "actor"

    def lookups(self, request, model_admin):
        labels = (AuditEvent.objects.order_by().values_list("actor_label", flat=True).distinct()[:100])
        return [(label, label) for label in sorted(labels)]

    def queryset(self, request, queryset):
        return queryset.filter(actor_label=self.value()) if self.value() else queryset


@admin.register(AuditEvent)
class AuditEventAdmin(authz.AuthzAdminMixin, admin.ModelAdmin):
    """Read-only: visible and filterable, never added, edited or deleted here."""

    list_display = ["created_at", "actor_label", "source", "action", "model_label", "object_link", "short_summary"]
    list_filter = ["action", "source", "model_label", ActorFilter, "created_at"]
    search_fields = ["actor_label", "object_repr", "object_id", "summary", "request_id"]
    date_hierarchy = "created_at"
    list_per_page = 100
    actions = ["export_selected_csv"]
    fields = ["created_at", "actor_label", "actor", "source", "action", "model_label", "object_id", "object_repr",
              "changes_table", "request_id"]
    readonly_fields = fields
    change_list_template = "admin/monitoring/auditevent/change_list.html"

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description=_("object"), ordering="object_repr")
    def object_link(self, obj: AuditEvent) -> str:
        return format_html("{} <span style='color:#888'>#{}</span>", obj.object_repr, obj.object_id)

    @admin.display(description=_("changes"))
    def short_summary(self, obj: AuditEvent) -> str:
        return obj.summary if len(obj.summary) <= 160 else obj.summary[:160] + "…"

    @admin.display(description=_("changes"))
    def changes_table(self, obj: AuditEvent) -> str:
        if not obj.changes:
            return "—"
        rows = []
        for name, change in obj.changes.items():
            if "added" in change or "removed" in change:
                removed, added = change.get("removed") or [], change.get("added") or []
                before = _("removed: %(items)s") % {"items": ", ".join(map(str, removed))} if removed else ""
                after = _("added: %(items)s") % {"items": ", ".join(map(str, added))} if added else ""
            else:
                before, after = change.get("before", ""), change.get("after", "")
            rows.append((name, _show(before), _show(after)))
        body = format_html_join("", "<tr><th>{}</th><td>{}</td><td>{}</td></tr>", rows)
        return format_html("<table><thead><tr><th>{}</th><th>{}</th><th>{}</th></tr></thead><tbody>{}</tbody></table>",
                           _("field"), _("before"), _("after"), body)

    def get_urls(self):
        urls = super().get_urls()
        export = path("export/", self.admin_site.admin_view(self.export_view), name="monitoring_auditevent_export")
        return [export] + urls

    def changelist_view(self, request, extra_context=None):
        extra_context = dict(extra_context or {})
        query = request.GET.urlencode()
        extra_context["export_url"] = reverse("admin:monitoring_auditevent_export") + (f"?{query}" if query else "")
        return super().changelist_view(request, extra_context)

    def export_view(self, request):
        """CSV of exactly what the change list shows with the same filters and search (all pages)."""
        if not self.has_view_permission(request):
            from django.core.exceptions import PermissionDenied

            raise PermissionDenied
        changelist = self.get_changelist_instance(request)
        return self._csv_response(request, changelist.get_queryset(request))

    @admin.action(description=_("Export selected events as CSV"))
    def export_selected_csv(self, request, queryset):
        return self._csv_response(request, queryset)

    def _csv_response(self, request, queryset):
        stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
        response = StreamingHttpResponse(audit_events_csv(user=request.user, events=queryset.order_by("-created_at",
                                                                                                       "-id")),
                                         content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="audit-{stamp}.csv"'
        return response


def _show(value) -> str:
    if value is None or value == "":
        return "—"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
