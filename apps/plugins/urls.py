from django.urls import path

from . import views

urlpatterns = [
    path("plugins/", views.PluginListView.as_view(), name="plugins"),
    path("plugins/reload/", views.PluginReloadView.as_view(), name="plugins-reload"),
    path("plugins/stats/", views.PluginStatsView.as_view(), name="plugins-stats"),
    path("plugins/<slug:name>/", views.PluginDetailView.as_view(), name="plugin-detail"),
    path("support-tickets/", views.TicketListView.as_view(), name="support-tickets"),
]
