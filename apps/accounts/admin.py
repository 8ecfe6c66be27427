from django.contrib import admin

from .models import DirectoryGroup, ExternalIdentity


class _ReadOnly(admin.ModelAdmin):
    """Written by sign-in only; administrators look (and may unlink by deleting)."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(ExternalIdentity)
class ExternalIdentityAdmin(_ReadOnly):
    list_display = ("user", "provider", "subject", "last_login_at", "created_at")
    list_filter = ("provider",)
    search_fields = ("user__username", "subject")
    list_select_related = ("user",)


@admin.register(DirectoryGroup)
class DirectoryGroupAdmin(_ReadOnly):
    list_display = ("group", "source")
    list_filter = ("source",)
    search_fields = ("group__name",)
    list_select_related = ("group",)
