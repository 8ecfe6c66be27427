"""Authorization: the one place that answers "may this user do this (to that)?".

Built on Django's permission system (users, groups, model permissions, superusers) plus one per-object
rule family, knowledge bases, whose readers and editors are named on the base itself. `is_staff` only
lets a person into the admin site (Django's own gate); by itself it grants nothing: a staff user with no
permissions sees an empty admin and is refused by every service.

Roles are groups holding permissions (see ROLES; `manage.py migrate` creates them, an operator adds
people to them in the admin):

- Knowledge editor (per base): the owner of a base, or a member of one of its `editor_groups`, edits that
  base (settings, documents). Holding `knowledge.change_knowledgebase` makes one an editor of every base;
  `knowledge.add_knowledgebase` lets one create bases (and own them).
- Knowledge reader: a base is searchable by its editors, members of its `allowed_groups`, everyone when it
  is public, and holders of `knowledge.view_knowledgebase` (every base).
- Plugin administrator: `plugins.change_pluginconfig` (configure, enable, reload, statistics).
- Support agent: `plugins.view_ticket` (every support ticket; others see their own).
- Auditor: `monitoring.view_auditevent` (audit log), `monitoring.view_dashboard`, `monitoring.view_cluster`.
- Key administrator: `core.revoke_any_apikey` (revoke anyone's API key). Only superusers issue keys for
  other users (audited).

Callers use `can(...)` for a yes/no and `require(...)` to raise PermissionDenied (403, stable code).
Every function accepts anonymous users and answers False for them and for inactive users.
"""
from __future__ import annotations

from typing import Any

from django.apps import apps as django_apps
from django.db.models import Q, QuerySet
from django.utils.translation import gettext_lazy

from .errors import PermissionDenied

# Role name -> permissions ("app_label.codename"). Created (and kept complete) after every migrate.
ROLES: dict[str, tuple[str, ...]] = {
    # Creates bases (and owns them); editing someone else's base needs that base's editor_groups.
    "Knowledge editors": ("knowledge.add_knowledgebase",),
    # Reads and searches every base, private ones included (compliance, support leads).
    "Knowledge readers": ("knowledge.view_knowledgebase",),
    "Plugin administrators": ("plugins.view_pluginconfig", "plugins.change_pluginconfig",
                              "plugins.view_plugininvocation"),
    "Support agents": ("plugins.view_ticket", "plugins.change_ticket"),
    "Auditors": ("monitoring.view_auditevent", "monitoring.view_dashboard", "monitoring.view_cluster"),
}

# action -> the Django permission that grants it to everyone holding it (global actions).
_GLOBAL: dict[str, str] = {
    "knowledge.create": "knowledge.add_knowledgebase",
    "knowledge.read_all": "knowledge.view_knowledgebase",
    "knowledge.edit_all": "knowledge.change_knowledgebase",
    "knowledge.delete_all": "knowledge.delete_knowledgebase",
    "plugins.manage": "plugins.change_pluginconfig",
    "tickets.view_all": "plugins.view_ticket",
    "audit.read": "monitoring.view_auditevent",
    "dashboard.view": "monitoring.view_dashboard",
    "cluster.view": "monitoring.view_cluster",
    "api_keys.revoke_any": "core.revoke_any_apikey",
}

_MESSAGES: dict[str, tuple[str, str]] = {  # action -> (code, message) when refused
    "knowledge.create": ("permission_denied", gettext_lazy("You may not create knowledge bases.")),
    "knowledge.edit": ("permission_denied", gettext_lazy("Only an editor of this knowledge base may change it.")),
    "knowledge.delete": ("permission_denied", gettext_lazy(
        "Only the owner (or a knowledge administrator) may delete this knowledge base.")),
    "plugins.manage": ("plugin_admin_only", gettext_lazy("Managing plugins requires the plugin administrator role.")),
    "audit.read": ("audit_forbidden", gettext_lazy(
        "Reading the audit log requires the 'view audit event' permission.")),
    "dashboard.view": ("dashboard_forbidden", gettext_lazy("The operations dashboard requires the auditor role.")),
    "cluster.view": ("permission_denied", gettext_lazy("The cluster page requires the auditor role.")),
    "api_keys.issue_for_others": ("permission_denied", gettext_lazy(
        "API keys are created for oneself; only superusers may issue keys for other users.")),
}


def active(user: Any) -> bool:
    """Signed in and not deactivated."""
    return bool(user is not None and getattr(user, "is_authenticated", False) and getattr(user, "is_active", False))


def has_perm(user: Any, perm: str) -> bool:
    """Django's permission check for an active user (superusers hold every permission)."""
    return active(user) and user.has_perm(perm)


def _group_ids(user: Any) -> set[int]:
    # Cached on the user object for the request, like Django's own permission cache.
    cached = getattr(user, "_authz_group_ids", None)
    if cached is None:
        cached = set(user.groups.values_list("pk", flat=True))
        try:
            user._authz_group_ids = cached
        except AttributeError:  # pragma: no cover - exotic user objects
            pass
    return cached


# --- knowledge bases ------------------------------------------------------------------------------

def knowledge_bases_readable(user: Any) -> QuerySet:
    """Knowledge bases `user` may search and read (anonymous and inactive users: public ones only)."""
    KnowledgeBase = django_apps.get_model("knowledge", "KnowledgeBase")
    qs = KnowledgeBase.objects.all()
    if not active(user):
        return qs.filter(is_public=True)
    if user.has_perm(_GLOBAL["knowledge.read_all"]) or user.has_perm(_GLOBAL["knowledge.edit_all"]):
        return qs
    groups = list(_group_ids(user))
    readable = (Q(is_public=True) | Q(owner=user) | Q(allowed_groups__in=groups) | Q(editor_groups__in=groups))
    return qs.filter(pk__in=KnowledgeBase.objects.filter(readable).values("pk"))


def knowledge_bases_editable(user: Any) -> QuerySet:
    """Knowledge bases whose settings and documents `user` may change."""
    KnowledgeBase = django_apps.get_model("knowledge", "KnowledgeBase")
    qs = KnowledgeBase.objects.all()
    if not active(user):
        return qs.none()
    if user.has_perm(_GLOBAL["knowledge.edit_all"]):
        return qs
    editable = Q(owner=user) | Q(editor_groups__in=list(_group_ids(user)))
    return qs.filter(pk__in=KnowledgeBase.objects.filter(editable).values("pk"))


def _kb_editor(user: Any, kb: Any) -> bool:
    if not active(user):
        return False
    if user.has_perm(_GLOBAL["knowledge.edit_all"]) or (kb.owner_id is not None and kb.owner_id == user.pk):
        return True
    if kb.pk is None:
        return False
    return kb.editor_groups.filter(pk__in=_group_ids(user)).exists()


def _kb_reader(user: Any, kb: Any) -> bool:
    if kb.is_public:
        return True
    if not active(user):
        return False
    if user.has_perm(_GLOBAL["knowledge.read_all"]) or _kb_editor(user, kb):
        return True
    return kb.allowed_groups.filter(pk__in=_group_ids(user)).exists()


# --- the questions --------------------------------------------------------------------------------

def can(user: Any, action: str, obj: Any = None) -> bool:
    """May `user` do `action` (to `obj`)? Unknown actions are refused (fail closed)."""
    if action in _GLOBAL:
        return has_perm(user, _GLOBAL[action])
    if action == "knowledge.read":
        return _kb_reader(user, obj)
    if action == "knowledge.edit":
        return _kb_editor(user, obj)
    if action == "knowledge.delete":
        return active(user) and (user.has_perm(_GLOBAL["knowledge.delete_all"])
                                 or (obj.owner_id is not None and obj.owner_id == user.pk))
    if action == "api_keys.issue_for_others":
        return active(user) and bool(getattr(user, "is_superuser", False))
    if action == "api_keys.revoke":  # obj: the ApiKey
        return active(user) and (obj.user_id == user.pk or user.has_perm(_GLOBAL["api_keys.revoke_any"]))
    return False


def require(user: Any, action: str, obj: Any = None, *, message: str | None = None) -> None:
    """Raise PermissionDenied (403) unless `can(user, action, obj)`."""
    if not can(user, action, obj):
        code, default = _MESSAGES.get(action, ("permission_denied",
                                               gettext_lazy("You do not have permission to do this.")))
        raise PermissionDenied(message or default, code=code)


def model_permission(user: Any, model: Any, kind: str) -> bool:
    """Django's model permission `kind` (view, add, change, delete) on `model`, for the admin."""
    opts = model._meta
    return has_perm(user, f"{opts.app_label}.{kind}_{opts.model_name}")


class AuthzAdminMixin:
    """ModelAdmin permissions answered by this module (model permissions; subclasses add object rules)."""

    def has_view_permission(self, request, obj=None) -> bool:
        return (model_permission(request.user, self.model, "view")
                or model_permission(request.user, self.model, "change"))

    def has_add_permission(self, request, *args) -> bool:
        return model_permission(request.user, self.model, "add")

    def has_change_permission(self, request, obj=None) -> bool:
        return model_permission(request.user, self.model, "change")

    def has_delete_permission(self, request, obj=None) -> bool:
        return model_permission(request.user, self.model, "delete")

    def has_module_permission(self, request) -> bool:
        return any(model_permission(request.user, self.model, kind) for kind in ("view", "add", "change", "delete"))


def roles_ensure(**_kwargs) -> None:
    """post_migrate: create the role groups and give each its permissions (idempotent, additive)."""
    from django.contrib.auth.models import Group, Permission

    for name, perms in ROLES.items():
        group, _ = Group.objects.get_or_create(name=name)
        wanted = []
        for perm in perms:
            app_label, codename = perm.split(".", 1)
            found = Permission.objects.filter(content_type__app_label=app_label, codename=codename).first()
            if found is not None:  # a permission of an app not migrated yet comes with its own post_migrate
                wanted.append(found)
        group.permissions.add(*wanted)
