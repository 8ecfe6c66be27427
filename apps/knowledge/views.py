"""REST endpoints and the source page. Thin: parse input, call a selector or service, serialize."""
from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.exceptions import SuspiciousOperation
from django.http import Http404
from django.shortcuts import render
from django.utils.translation import gettext
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.core.errors import ApplicationError, NotFound
from apps.core.schema import paginated

from . import selectors, services
from .serializers import (
    DocumentDetailSerializer,
    DocumentSerializer,
    DocumentUpdateSerializer,
    DocumentUploadSerializer,
    KnowledgeBaseSerializer,
    KnowledgeBaseWriteSerializer,
    SearchResponseSerializer,
    UploadResultSerializer,
)

ERRORS = {400: OpenApiTypes.OBJECT, 403: OpenApiTypes.OBJECT, 404: OpenApiTypes.OBJECT}


def _paginate(view: APIView, request, queryset, serializer_class):
    paginator = LimitOffsetPagination()
    page = paginator.paginate_queryset(queryset, request, view=view)
    data = serializer_class(page, many=True, context={"request": request}).data
    return paginator.get_paginated_response(data)


def _kb_with_stats(user, kb_id: int):
    kb = selectors.knowledge_bases_with_stats(user=user).filter(pk=kb_id).first()
    if kb is None:
        raise NotFound(gettext("No such knowledge base."), code="knowledge_base_not_found")
    return kb


class KnowledgeBaseListCreateView(APIView):
    @extend_schema(responses=paginated(KnowledgeBaseSerializer), operation_id="knowledge_bases_list",
                   summary="Knowledge bases you can read",
                   tags=["knowledge"])
    def get(self, request):
        queryset = selectors.knowledge_bases_with_stats(user=request.user).order_by("name", "pk")
        return _paginate(self, request, queryset, KnowledgeBaseSerializer)

    @extend_schema(request=KnowledgeBaseWriteSerializer, responses={201: KnowledgeBaseSerializer, **ERRORS},
                   summary="Create a knowledge base (the knowledge.add_knowledgebase permission)",
                   tags=["knowledge"])
    def post(self, request):
        params = KnowledgeBaseWriteSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        kb = services.knowledge_base_create(user=request.user, **params.validated_data)
        data = KnowledgeBaseSerializer(_kb_with_stats(request.user, kb.pk), context={"request": request}).data
        return Response(data, status=status.HTTP_201_CREATED)


class KnowledgeBaseDetailView(APIView):
    @extend_schema(responses={200: KnowledgeBaseSerializer, 404: OpenApiTypes.OBJECT}, summary="A knowledge base",
                   tags=["knowledge"])
    def get(self, request, kb_id: int):
        return Response(KnowledgeBaseSerializer(_kb_with_stats(request.user, kb_id), context={"request": request}).data)

    @extend_schema(request=KnowledgeBaseWriteSerializer(partial=True), responses={200: KnowledgeBaseSerializer, **ERRORS},
                   summary="Change a knowledge base (its editors)", tags=["knowledge"])
    def patch(self, request, kb_id: int):
        kb = selectors.knowledge_base_get(user=request.user, ref=kb_id)
        params = KnowledgeBaseWriteSerializer(data=request.data, partial=True)
        params.is_valid(raise_exception=True)
        services.knowledge_base_update(user=request.user, knowledge_base=kb, **params.validated_data)
        return Response(KnowledgeBaseSerializer(_kb_with_stats(request.user, kb_id), context={"request": request}).data)

    @extend_schema(responses={204: None, **ERRORS}, summary="Delete a knowledge base, its documents and indexes",
                   tags=["knowledge"])
    def delete(self, request, kb_id: int):
        kb = selectors.knowledge_base_get(user=request.user, ref=kb_id)
        services.knowledge_base_delete(user=request.user, knowledge_base=kb)
        return Response(status=status.HTTP_204_NO_CONTENT)


class DocumentListUploadView(APIView):
    parser_classes = [MultiPartParser, FormParser, JSONParser]

    @extend_schema(
        parameters=[OpenApiParameter("status", str, enum=["pending", "processing", "ready", "failed"],
                                     description="Only documents in this state")],
        responses={200: paginated(DocumentSerializer), 404: OpenApiTypes.OBJECT},
        operation_id="knowledge_bases_documents_list",
        summary="Documents of a knowledge base, with their ingestion status", tags=["knowledge"])
    def get(self, request, kb_id: int):
        kb = selectors.knowledge_base_get(user=request.user, ref=kb_id)
        queryset = selectors.documents_for(user=request.user, knowledge_base=kb,
                                           status=request.query_params.get("status") or None)
        return _paginate(self, request, queryset, DocumentSerializer)

    @extend_schema(
        request={"multipart/form-data": DocumentUploadSerializer},
        responses={201: UploadResultSerializer, 200: UploadResultSerializer, 413: OpenApiTypes.OBJECT, **ERRORS},
        summary="Upload one or more files (each is judged on its own; ingestion runs in the background)",
        tags=["knowledge"])
    def post(self, request, kb_id: int):
        kb = selectors.knowledge_base_get(user=request.user, ref=kb_id)
        try:
            files = request.FILES.getlist("files") or request.FILES.getlist("file")
        except SuspiciousOperation as exc:  # e.g. more files than DATA_UPLOAD_MAX_NUMBER_FILES
            raise ApplicationError("too_many_files", str(exc) or "Too many files in one request.") from exc
        outcomes = services.documents_upload(knowledge_base=kb, user=request.user, files=files)
        results = [outcome.to_dict() for outcome in outcomes]
        if all(outcome.error_code == "too_large" for outcome in outcomes):
            raise ApplicationError("too_large", gettext("Every file is over the size limit."), details={"results": results},
                                   status=413)
        documents = [outcome.document for outcome in outcomes if outcome.document is not None]
        created = any(outcome.status == "created" for outcome in outcomes)
        body = {"results": results, "documents": DocumentSerializer(documents, many=True).data}
        return Response(body, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class DocumentDetailView(APIView):
    @extend_schema(responses={200: DocumentDetailSerializer, 404: OpenApiTypes.OBJECT},
                   summary="A document with its chunks", tags=["knowledge"])
    def get(self, request, document_id: int):
        return Response(DocumentDetailSerializer(selectors.document_get(user=request.user, document_id=document_id)).data)

    @extend_schema(request=DocumentUpdateSerializer, responses={200: DocumentSerializer, **ERRORS},
                   summary="Rename a document or move it to another knowledge base (editors of both)",
                   tags=["knowledge"])
    def patch(self, request, document_id: int):
        document = selectors.document_get(user=request.user, document_id=document_id)
        params = DocumentUpdateSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        if "title" in data:
            services.document_rename(document=document, user=request.user, title=data["title"])
        if "knowledge_base" in data:
            target = selectors.knowledge_base_get(user=request.user, ref=data["knowledge_base"])
            services.document_move(document=document, user=request.user, knowledge_base=target)
        document.refresh_from_db()
        return Response(DocumentSerializer(document).data)

    @extend_schema(responses={202: None, 403: OpenApiTypes.OBJECT, 404: OpenApiTypes.OBJECT},
                   summary="Delete a document (hidden from search at once, purged in the background)",
                   tags=["knowledge"])
    def delete(self, request, document_id: int):
        document = selectors.document_get(user=request.user, document_id=document_id)
        services.document_delete(document=document, user=request.user)
        return Response(status=status.HTTP_202_ACCEPTED)


class DocumentReindexView(APIView):
    @extend_schema(request=None, responses={202: DocumentSerializer, 403: OpenApiTypes.OBJECT,
                                            404: OpenApiTypes.OBJECT},
                   summary="Re-ingest a document even if unchanged", tags=["knowledge"])
    def post(self, request, document_id: int):
        document = selectors.document_get(user=request.user, document_id=document_id)
        services.document_reindex(documents=[document], user=request.user)
        document.refresh_from_db()
        return Response(DocumentSerializer(document).data, status=status.HTTP_202_ACCEPTED)


def _int_param(raw: str | None, default: int):
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        return raw  # the selector answers invalid_top_k with the offending value


class SearchView(APIView):
    api_key_scope = "search"  # apps/core/scopes.py (other views: read for GET, manage for writes)
    @extend_schema(
        parameters=[
            OpenApiParameter("q", str, required=True, description="The query"),
            OpenApiParameter("kb", str, many=True, description="Knowledge base id or slug (repeat or comma-separate); "
                                                               "default: every one you can read"),
            OpenApiParameter("top_k", int, description="Results to return (1 to RETRIEVAL_MAX_TOP_K, default 8)"),
            OpenApiParameter("mode", str, enum=["hybrid", "dense", "bm25"], description="Default hybrid"),
        ],
        responses={200: SearchResponseSerializer, 400: OpenApiTypes.OBJECT, 404: OpenApiTypes.OBJECT},
        summary="Search chunks with scores of each stage and citation fields", tags=["knowledge"])
    def get(self, request):
        params = request.query_params
        refs = [ref.strip() for raw in params.getlist("kb") for ref in raw.split(",") if ref.strip()]
        top_k = _int_param(params.get("top_k"), 8)
        mode = params.get("mode") or "hybrid"
        query = params.get("q", "")
        results = selectors.chunks_retrieve(user=request.user, query=query, knowledge_bases=refs or None,
                                            top_k=top_k, mode=mode)
        return Response({"query": " ".join(query.split()), "mode": mode, "top_k": top_k,
                         "results": [result.to_dict() for result in results]})


@login_required
def source_view(request, document_id: int):
    """The cited document with the chunk highlighted (scrolled into view), its page and heading path."""
    raw_chunk = request.GET.get("chunk")
    chunk_id = int(raw_chunk) if raw_chunk and raw_chunk.isdigit() else None
    try:
        context = selectors.source_view_context(user=request.user, document_id=document_id, chunk_id=chunk_id)
    except NotFound:
        raise Http404("No such document.")
    return render(request, "knowledge/source.html", context)
