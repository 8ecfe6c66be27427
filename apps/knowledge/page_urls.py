from django.urls import path

from . import views

urlpatterns = [
    path("sources/<int:document_id>/", views.source_view, name="knowledge-source"),
]
