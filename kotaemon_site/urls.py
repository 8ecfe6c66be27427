from django.conf import settings
from django.contrib import admin
from django.urls import include, path
from django.views.i18n import JavaScriptCatalog
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from apps.accounts.views import LogoutView

# Each app owns its API routes under /api/v1/.
api_v1 = [
    path("", include("apps.core.urls")),
    path("", include("apps.knowledge.urls")),
    path("", include("apps.conversations.urls")),
    path("", include("apps.plugins.urls")),
]

urlpatterns = [
    # Signing out ends a single sign-on session at the identity provider too (before the defaults).
    path("admin/logout/", LogoutView.as_view(), name="admin-logout"),
    path("accounts/logout/", LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("oidc/", include("apps.accounts.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/v1/", include((api_v1, "api"), namespace="v1")),
    # OpenAI-compatible chat API (docs/conversations.md): SDKs and chat UIs point their base URL at /v1.
    path("v1/", include("apps.conversations.openai_urls")),
    path("", include("apps.monitoring.urls")),
    # Language switch (POST i18n/setlang/ remembers the choice in a cookie) and the JavaScript catalog.
    path("i18n/", include("django.conf.urls.i18n")),
    path("jsi18n/", JavaScriptCatalog.as_view(), name="javascript-catalog"),
    # Pages (the web chat at /, source views) come last.
    path("", include("apps.knowledge.page_urls")),
    path("", include("apps.conversations.page_urls")),
]

handler404 = "apps.core.errors.handler404"
handler500 = "apps.core.errors.handler500"

if settings.DEBUG:
    from django.conf.urls.static import static

    urlpatterns += static(settings.MEDIA_URL, document_root=settings.MEDIA_ROOT)
