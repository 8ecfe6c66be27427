"""Admin: plugin list (status, load errors), config editor, reload, invocation stats, support tickets.

Every write goes through services.plugin_config_update / plugins_reload, so an admin change bumps the
plugin config version and is broadcast exactly like one made from the API or a command.
"""
from __future__ import annotations

import json

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.models import Group
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext_lazy as _

from apps.core import authz
from apps.core.errors import ApplicationError

from . import schema
from .models import PluginConfig, PluginInvocation, Ticket
from .selectors import invocation_stats, plugin_list
from .services import plugin_config_update, plugin_config_validate, plugins_reload, plugins_snapshot, plugins_sync

_STATUS_COLOURS = {"enabled": "#2e7d32", "disabled": "#757575", "invalid_config": "#c62828",
                   "not_installed": "#ef6c00"}
_STATUS_LABELS = {"enabled": _("enabled"), "disabled": _("disabled"), "invalid_config": _("invalid config"),
                  "not_installed": _("not installed")}


def _view_for(name: str):
    return plugins_snapshot(need_catalogue=True).plugins.get(name)


class PluginConfigForm(forms.ModelForm):
    config = forms.CharField(widget=forms.Textarea(attrs={"rows": 12, "cols": 90, "style": "font-family:monospace"}),
                             required=False, help_text=_("JSON object. Omitted settings use the defaults shown below."))
    allowed_hosts = forms.CharField(required=False, widget=forms.TextInput(attrs={"size": 80}),
                                    help_text=_("Comma-separated hosts the plugin may call (host, host:port, "
                                                "*.domain). URL settings never allow their own host."))
    granted_scopes = forms.CharField(required=False, widget=forms.TextInput(attrs={"size": 40}),
                                     help_text=_("Comma-separated sensitive scopes granted to this plugin, e.g. "
                                                 "knowledge:read (chunk text in after_retrieval hooks)."))
    allowed_groups = forms.ModelMultipleChoiceField(queryset=Group.objects.all(), required=False,
                                                    widget=admin.widgets.FilteredSelectMultiple(_("groups"), False),
                                                    help_text=_("Empty: every signed-in user may trigger this plugin."))

    class Meta:
        model = PluginConfig
        fields = ["enabled", "config", "allowed_groups", "allowed_hosts", "granted_scopes", "timeout_seconds"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.view = _view_for(self.instance.name) if self.instance and self.instance.name else None
        meta = (self.view.meta if self.view else None) or {}
        self.config_schema = meta.get("config_schema") or {"type": "object"}
        self.secret_names = schema.secret_fields(self.config_schema)
        if not self.is_bound:
            self.initial["config"] = json.dumps(self.instance.config or {}, indent=2, sort_keys=True)
            self.initial["allowed_hosts"] = ", ".join(self.instance.allowed_hosts or [])
            self.initial["granted_scopes"] = ", ".join(self.instance.granted_scopes or [])
        set_ = set(self.view.secrets_set) if self.view else set()
        for name in self.secret_names:
            state = _("set; leave blank to keep") if name in set_ else _("not set")
            # render_value=False: a stored secret is never sent back to the browser.
            self.fields[f"secret__{name}"] = forms.CharField(
                required=False, label=_("Secret: %(name)s") % {"name": name}, widget=forms.PasswordInput(render_value=False),
                help_text=f"({state}) {self.config_schema['properties'][name].get('description', '')}")
            self.fields[f"clear__{name}"] = forms.BooleanField(required=False,
                                                               label=_("Clear secret %(name)s") % {"name": name})

    def clean_config(self):
        raw = self.cleaned_data.get("config") or "{}"
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise forms.ValidationError(_("Not valid JSON: %(error)s") % {"error": exc})
        if not isinstance(value, dict):
            raise forms.ValidationError(_("The config must be a JSON object ({...})."))
        return value

    def clean_granted_scopes(self):
        return [h.strip() for h in (self.cleaned_data.get("granted_scopes") or "").split(",") if h.strip()]

    def clean_allowed_hosts(self):
        return [h.strip() for h in (self.cleaned_data.get("allowed_hosts") or "").split(",") if h.strip()]

    def service_kwargs(self) -> dict:
        data = self.cleaned_data
        return {
            "enabled": data.get("enabled", False), "config": data.get("config", {}),
            "secrets": {n: data.get(f"secret__{n}") for n in self.secret_names if data.get(f"secret__{n}")},
            "clear_secrets": [n for n in self.secret_names if data.get(f"clear__{n}")],
            "allowed_groups": list(data.get("allowed_groups") or []), "allowed_hosts": data.get("allowed_hosts", []),
            "granted_scopes": data.get("granted_scopes", []),
            "timeout_seconds": data.get("timeout_seconds"),
        }

    def clean(self):
        cleaned = super().clean()
        if self.errors or not self.instance.name:
            return cleaned
        kwargs = self.service_kwargs()
        kwargs.pop("allowed_groups")
        try:
            plugin_config_validate(name=self.instance.name, **kwargs)
        except ApplicationError as exc:
            problems = exc.details.get("problems") or []
            if problems:
                self.add_error("config", [f"{p['field']}: {p['message']}" for p in problems])
            else:
                self.add_error(None, exc.message)
        return cleaned


@admin.register(PluginConfig)
class PluginConfigAdmin(authz.AuthzAdminMixin, admin.ModelAdmin):
    form = PluginConfigForm
    list_display = ["name", "status_badge", "description", "scopes", "groups", "version", "updated_at"]
    readonly_fields = ["name", "status_badge", "plugin_details", "version", "updated_at", "updated_by"]
    actions = ["enable", "disable"]
    change_list_template = "admin/plugins/pluginconfig/change_list.html"

    def get_fieldsets(self, request, obj=None):
        form = self.get_form(request, obj)(instance=obj) if obj else None
        secret_fields = [f for f in (form.fields if form else {}) if f.startswith(("secret__", "clear__"))]
        sets = [(None, {"fields": ["name", "status_badge", "plugin_details"]}),
                (_("Configuration"), {"fields": ["enabled", "config"]})]
        if secret_fields:
            sets.append((_("Secrets (write-only)"), {"fields": secret_fields}))
        sets.append((_("Permissions and limits"), {"fields": ["allowed_groups", "allowed_hosts", "granted_scopes", "timeout_seconds"]}))
        sets.append((_("History"), {"fields": ["version", "updated_at", "updated_by"]}))
        return sets

    def get_form(self, request, obj=None, change=False, **kwargs):
        kwargs["fields"] = ["enabled", "config", "allowed_groups", "allowed_hosts", "granted_scopes", "timeout_seconds"]
        return super().get_form(request, obj, change, **kwargs)

    def has_add_permission(self, request) -> bool:
        return False  # rows are created by discovery (plugins_sync)

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description=_("status"))
    def status_badge(self, obj: PluginConfig) -> str:
        view = _view_for(obj.name)
        status = view.status if view else "not_installed"
        return format_html('<b style="color:{}">{}</b>', _STATUS_COLOURS.get(status, "#000"),
                           _STATUS_LABELS.get(status, status.replace("_", " ")))

    @admin.display(description=_("description"))
    def description(self, obj: PluginConfig) -> str:
        view = _view_for(obj.name)
        return ((view.meta or {}).get("description") or "") if view else ""

    @admin.display(description=_("scopes"))
    def scopes(self, obj: PluginConfig) -> str:
        view = _view_for(obj.name)
        return ", ".join(view.scopes) if view else ""

    @admin.display(description=_("allowed groups"))
    def groups(self, obj: PluginConfig) -> str:
        names = [g.name for g in obj.allowed_groups.all()]
        return ", ".join(names) if names else _("everyone")

    @admin.display(description=_("plugin"))
    def plugin_details(self, obj: PluginConfig) -> str:
        view = _view_for(obj.name)
        if view is None or view.meta is None:
            return _("Not installed or failed to load (see the plugin list).")
        meta = view.meta
        props = schema.properties(meta.get("config_schema") or {})
        rows = format_html_join("", "<tr><td><code>{}</code></td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>", (
            (k, v.get("type", ""), _("(secret)") if v.get("secret") else json.dumps(v.get("default")) if "default" in v else "",
             v.get("description", "")) for k, v in props.items()))
        intents = ", ".join(sorted({i.intent for i in view.intents()})) or _("none")
        problems = format_html_join("", "<li>{}: {}</li>", ((p["field"], p["message"]) for p in view.problems))
        return format_html(
            _("<p>{} (version {}, from {} <code>{}</code>)</p><p>Scopes: {} &middot; intents: {} &middot; allowed hosts: {}</p>"
              "{}<table><tr><th>setting</th><th>type</th><th>default</th><th>description</th></tr>{}</table>"),
            meta.get("description", ""), meta.get("version", ""), meta.get("source", ""), meta.get("ref", ""),
            ", ".join(view.scopes) or _("none"), intents, ", ".join(view.allowed_hosts) or _("none"),
            format_html('<ul class="errorlist">{}</ul>', problems) if view.problems else "", rows)

    def save_model(self, request, obj, form, change):
        try:
            row = plugin_config_update(name=obj.name, actor=request.user, **form.service_kwargs())
        except ApplicationError as exc:  # validated in the form already; a race is still reported cleanly
            messages.error(request, exc.message)
            return
        obj.pk, obj.version = row.pk, row.version

    def save_related(self, request, form, formsets, change):
        pass  # groups were saved by the service

    def changelist_view(self, request, extra_context=None):
        plugins_sync()
        listing = plugin_list()
        extra_context = (extra_context or {}) | {"load_errors": listing["load_errors"],
                                                 "plugin_version": listing["version"]}
        return super().changelist_view(request, extra_context=extra_context)

    def get_urls(self):
        urls = [
            path("reload/", self.admin_site.admin_view(self.reload_view), name="plugins_pluginconfig_reload"),
            path("stats/", self.admin_site.admin_view(self.stats_view), name="plugins_pluginconfig_stats"),
        ]
        return urls + super().get_urls()

    def reload_view(self, request):
        if request.method != "POST" or not self.has_change_permission(request):
            return HttpResponseRedirect(reverse("admin:plugins_pluginconfig_changelist"))
        snap = plugins_reload(actor=request.user)
        messages.success(request, _("Plugins reloaded (config version %(version)s); %(errors)d module(s) failed to load.")
                         % {"version": snap.version, "errors": len(snap.load_errors)})
        return HttpResponseRedirect(reverse("admin:plugins_pluginconfig_changelist"))

    def stats_view(self, request):
        try:
            days = max(1, min(90, int(request.GET.get("days", 0)))) if request.GET.get("days") else None
        except ValueError:
            days = None
        stats = invocation_stats(days=days)
        context = self.admin_site.each_context(request) | {
            "title": _("Plugin invocation stats"), "stats": stats, "days": stats[0]["days"] if stats else (days or 7),
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/plugins/pluginconfig/stats.html", context)

    @admin.action(description=_("Enable selected plugins"))
    def enable(self, request, queryset):
        self._set_enabled(request, queryset, True)

    @admin.action(description=_("Disable selected plugins"))
    def disable(self, request, queryset):
        self._set_enabled(request, queryset, False)

    def _set_enabled(self, request, queryset, enabled: bool) -> None:
        for row in queryset:
            try:
                plugin_config_update(name=row.name, actor=request.user, enabled=enabled)
                messages.success(request, (_("%(name)s enabled.") if enabled else _("%(name)s disabled.")) % {"name": row.name})
            except ApplicationError as exc:
                messages.error(request, f"{row.name}: {exc.message}")


@admin.register(PluginInvocation)
class PluginInvocationAdmin(authz.AuthzAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "plugin", "stage", "intent", "outcome", "error_code", "duration_ms", "user"]
    list_filter = ["outcome", "plugin", "stage"]
    search_fields = ["plugin", "intent", "error_code"]
    date_hierarchy = "created_at"
    list_select_related = ["user"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Ticket)
class TicketAdmin(authz.AuthzAdminMixin, admin.ModelAdmin):
    list_display = ["number", "subject", "user", "status", "priority", "assignee", "created_at"]
    list_filter = ["status", "priority", "source_plugin"]
    search_fields = ["number", "subject", "user__username", "user__email"]
    list_select_related = ["user", "assignee"]
    readonly_fields = ["number", "user", "subject", "description", "conversation_transcript", "conversation_id",
                       "session_id", "source_plugin", "created_at", "updated_at"]
    fields = ["number", "user", "subject", "status", "priority", "assignee", "description", "conversation_transcript",
              "conversation_id", "session_id", "source_plugin", "created_at", "updated_at"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description=_("conversation"))
    def conversation_transcript(self, obj: Ticket) -> str:
        return format_html_join("", "<p><b>{}:</b> {}</p>",
                                ((t.get("role", ""), t.get("content", "")) for t in obj.transcript or []))
