"""Custom staff pages in the Django admin (the cluster page, the operations dashboard).

The admin has no registry for pages that are not models, so its URL list and app list are extended
once per page; the page shows as its own "app" with one view-only entry.
"""
from __future__ import annotations

from typing import Callable

from django.contrib import admin
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.urls import path, reverse


def admin_page_install(*, route: str, view: Callable, url_name: str, section_label: str, app_name: str,
                       entry_name: str, permission: str, first: bool = False, site: admin.AdminSite = admin.site
                       ) -> None:
    """Serve `view` at /admin/<route> (the admin's login, through admin_view) to users that apps.core.authz
    allows `permission` (an action name), and list it in their admin index. Idempotent per url_name."""
    from . import authz

    installed = site.__dict__.setdefault("_kotaemon_pages", set())
    if url_name in installed:
        return
    installed.add(url_name)
    original_urls, original_app_list = site.get_urls, site.get_app_list

    def guarded(request, *args, **kwargs):
        if not authz.can(request.user, permission):
            raise DjangoPermissionDenied
        return view(request, *args, **kwargs)

    def get_urls():
        return [path(route, site.admin_view(guarded), name=url_name)] + original_urls()

    def get_app_list(request, app_label=None):  # Django's signature: app_label filters the index
        app_list = original_app_list(request, app_label)
        if app_label in (None, section_label) and authz.can(request.user, permission):
            url = reverse(f"{site.name}:{url_name}")
            entry = {"name": app_name, "app_label": section_label, "app_url": url, "has_module_perms": True,
                     "models": [{"name": entry_name, "object_name": entry_name, "admin_url": url,
                                 "add_url": None, "view_only": True, "perms": {"view": True}}]}
            app_list.insert(0 if first else len(app_list), entry)
        return app_list

    site.get_urls = get_urls
    site.get_app_list = get_app_list
