from django.urls import path

from . import views

urlpatterns = [
    path("knowledge-bases/", views.KnowledgeBaseListCreateView.as_view(), name="knowledge-bases"),
    path("knowledge-bases/<int:kb_id>/", views.KnowledgeBaseDetailView.as_view(), name="knowledge-base"),
    path("knowledge-bases/<int:kb_id>/documents/", views.DocumentListUploadView.as_view(), name="knowledge-documents"),
    path("documents/<int:document_id>/", views.DocumentDetailView.as_view(), name="document"),
    path("documents/<int:document_id>/reindex/", views.DocumentReindexView.as_view(), name="document-reindex"),
    path("search/", views.SearchView.as_view(), name="search"),
]
