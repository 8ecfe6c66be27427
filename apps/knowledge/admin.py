"""Editor console: knowledge bases, documents (status badges, chunk preview), index versions,
multi-file upload and a test-retrieval page. Writes go through the services, like the API."""
from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import Count, Max, OuterRef, Q, Subquery
from django.http import HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.text import Truncator
from django.utils.translation import gettext_lazy as _

from apps.core import authz
from apps.core.errors import ApplicationError

from . import selectors, services
from .forms import DocumentAdminForm, KnowledgeBaseAdminForm, TestRetrievalForm, UploadForm
from .model_choice import embedding_choice_reason, embedding_model_auto_enabled
from .models import Chunk, Document, IndexVersion, KnowledgeBase

_BADGE_COLOURS = {
    "pending": ("#495057", "#e9ecef"), "processing": ("#1864ab", "#d0ebff"), "ready": ("#2b8a3e", "#d3f9d8"),
    "failed": ("#c92a2a", "#ffe3e3"), "building": ("#1864ab", "#d0ebff"), "active": ("#2b8a3e", "#d3f9d8"),
    "retired": ("#495057", "#e9ecef"),
}


def badge(value: str, label: str | None = None, title: str = ""):
    ink, background = _BADGE_COLOURS.get(value, ("#495057", "#e9ecef"))
    return format_html('<span title="{}" style="display:inline-block;padding:1px 8px;border-radius:10px;'
                       'font-size:11px;font-weight:600;color:{};background:{}">{}</span>',
                       title, ink, background, label or value)


def _kb_admin_visible(user) -> bool:
    return (authz.can(user, "knowledge.create") or authz.can(user, "knowledge.read_all")
            or authz.knowledge_bases_editable(user).exists())


class IndexVersionInline(admin.TabularInline):
    model = IndexVersion
    extra = 0
    max_num = 0
    can_delete = False
    ordering = ["-version"]
    fields = ["version", "status_badge", "embedding", "progress", "build_kind", "segment_count", "chunk_count",
              "document_count", "written_count", "tombstone_count", "dense_kind", "encoded_count", "build_seconds",
              "created_at", "activated_at", "retired_at"]
    readonly_fields = fields
    verbose_name_plural = _("Index versions (newest first)")

    def has_view_permission(self, request, obj=None) -> bool:  # obj: the knowledge base being shown
        return obj is None or authz.can(request.user, "knowledge.edit", obj) or authz.can(request.user,
                                                                                        "knowledge.read_all")

    def get_queryset(self, request):
        return super().get_queryset(request).order_by("-version")

    @admin.display(description=_("status"))
    def status_badge(self, obj):
        return badge(obj.status, title=obj.error_message)

    @admin.display(description=_("embedding model"))
    def embedding(self, obj):
        return embedding_label(obj)

    @admin.display(description=_("encoding progress"))
    def progress(self, obj):
        return encode_progress(obj)


def embedding_label(version: IndexVersion) -> str:
    if not version.embedding_key:
        return version.embedding_model
    return f"{version.embedding_key} · {version.embedding_backend} · {version.embedding_dimension or '?'}d"


def encode_progress(version: IndexVersion):
    """Chunks encoded of those this build must encode (a model change re-encodes all of them)."""
    if not version.encode_total:
        return "–"
    if version.status == IndexVersion.Status.BUILDING:
        percent = 100 * version.encoded_count // max(1, version.encode_total)
        return format_html('<progress value="{}" max="{}"></progress> {} / {} ({}%)', version.encoded_count,
                           version.encode_total, version.encoded_count, version.encode_total, percent)
    return f"{version.encoded_count} / {version.encode_total}"


@admin.register(KnowledgeBase)
class KnowledgeBaseAdmin(admin.ModelAdmin):
    form = KnowledgeBaseAdminForm
    list_display = ["name", "slug", "owner", "visibility", "embedding", "documents_total", "documents_ready",
                    "documents_failed", "active_index", "index_health", "last_build"]
    list_filter = ["is_public"]
    search_fields = ["name", "slug", "description"]
    prepopulated_fields = {"slug": ["name"]}
    filter_horizontal = ["allowed_groups", "editor_groups"]
    inlines = [IndexVersionInline]
    actions = ["rebuild_indexes", "reindex_documents"]
    fieldsets = [
        (None, {"fields": ["name", "slug", "description"]}),
        (_("Access"), {"fields": ["owner", "is_public", "allowed_groups", "editor_groups"]}),
        (_("Embedding model"), {"fields": ["embedding_model", "embedding_reason"],
                                "description": _("Changing the model re-embeds every chunk in the background; "
                                                 "searches keep using the current index version (and its model) "
                                                 "until the new one is built. Progress shows under Index versions.")}),
        (_("Chunking"), {"fields": ["chunk_tokens", "chunk_overlap"],
                         "description": _("Sizes are in the embedding model's tokens; changing them re-chunks every "
                                          "document (unchanged text keeps its stored embedding).")}),
        (_("Retrieval"), {"fields": ["fusion", "rrf_k", "dense_weight", "candidates", "mmr_lambda", "use_reranker"]}),
        (_("Keyword search"), {"fields": ["user_dictionary"],
                               "description": _("Terms listed here are kept whole by the keyword (BM25) analyzer "
                                                "for documents and questions alike; saving a change rebuilds "
                                                "the index.")}),
    ]

    # Permissions come from apps.core.authz: per-base editors (owner, editor groups), knowledge
    # administrators (model permissions), readers of every base (view permission). Staff alone: nothing.
    def has_module_permission(self, request) -> bool:
        return _kb_admin_visible(request.user)

    def has_view_permission(self, request, obj=None) -> bool:
        if obj is None:
            return _kb_admin_visible(request.user)
        return authz.can(request.user, "knowledge.edit", obj) or authz.can(request.user, "knowledge.read_all")

    def has_add_permission(self, request) -> bool:
        return authz.can(request.user, "knowledge.create")

    def has_change_permission(self, request, obj=None) -> bool:
        if obj is None:
            return authz.knowledge_bases_editable(request.user).exists()
        return authz.can(request.user, "knowledge.edit", obj)

    def has_delete_permission(self, request, obj=None) -> bool:
        if obj is None:
            return authz.can(request.user, "knowledge.delete_all") or (
                authz.active(request.user) and KnowledgeBase.objects.filter(owner=request.user).exists())
        return authz.can(request.user, "knowledge.delete", obj)

    def get_queryset(self, request):
        active = IndexVersion.objects.filter(knowledge_base=OuterRef("pk"), status=IndexVersion.Status.ACTIVE)
        live = Q(documents__deleted_at__isnull=True)
        qs = super().get_queryset(request).filter(deleted_at__isnull=True)  # deleted: hidden, purged in the background
        if not authz.can(request.user, "knowledge.read_all"):
            qs = qs.filter(pk__in=authz.knowledge_bases_editable(request.user).values("pk"))
        return qs.select_related("owner").annotate(
            n_documents=Count("documents", filter=live, distinct=True),
            n_ready=Count("documents", filter=live & Q(documents__status="ready"), distinct=True),
            n_failed=Count("documents", filter=live & Q(documents__status="failed"), distinct=True),
            active_version=Subquery(active.values("version")[:1]),
            active_chunks=Subquery(active.values("chunk_count")[:1]),
            last_build_at=Max("index_versions__created_at"),
        )

    readonly_fields = ["embedding_reason"]

    @admin.display(description=_("embedding model"), ordering="embedding_model")
    def embedding(self, obj):
        if obj.embedding_model_auto:
            return format_html('<span title="{}">{} · {}</span>', embedding_choice_reason(obj), obj.embedding_model,
                               _("automatic"))
        return obj.embedding_model

    @admin.display(description=_("why this model"))
    def embedding_reason(self, obj):
        if obj is None or obj.pk is None:
            return _("Decided by the language of the first documents, unless you pick a model.")
        return embedding_choice_reason(obj)

    @admin.display(description=_("visibility"))
    def visibility(self, obj):
        if obj.is_public:
            return badge("ready", _("public"))
        return badge("pending", _("restricted"))

    @admin.display(description=_("documents"), ordering="n_documents")
    def documents_total(self, obj):
        url = reverse("admin:knowledge_document_changelist") + f"?knowledge_base__id__exact={obj.pk}"
        return format_html('<a href="{}">{}</a>', url, obj.n_documents)

    @admin.display(description=_("ready"), ordering="n_ready")
    def documents_ready(self, obj):
        return obj.n_ready

    @admin.display(description=_("failed"), ordering="n_failed")
    def documents_failed(self, obj):
        if not obj.n_failed:
            return 0
        url = reverse("admin:knowledge_document_changelist") + f"?knowledge_base__id__exact={obj.pk}&status__exact=failed"
        return format_html('<a href="{}" style="color:#c92a2a;font-weight:600">{}</a>', url, obj.n_failed)

    @admin.display(description=_("active index"), ordering="active_version")
    def active_index(self, obj):
        if obj.active_version is None:
            return badge("pending", _("none"))
        return format_html(_("v{} · {} chunks"), obj.active_version, obj.active_chunks)

    @admin.display(description=_("index here"))
    def index_health(self, obj):
        """This instance's copy of the base's index: a version it cannot load degrades only this base."""
        from .index_registry import registry

        state = registry.status(obj.pk)
        labels = {"ok": ("ready", _("loaded")), "loading": ("processing", _("loading")),
                  "cold": ("pending", _("not loaded")), "degraded": ("failed", _("degraded")),
                  "unavailable": ("failed", _("unavailable"))}
        colour, label = labels[state["state"]]
        return badge(colour, label, title=state["error"])

    @admin.display(description=_("last build"), ordering="last_build_at")
    def last_build(self, obj):
        return obj.last_build_at

    def save_model(self, request, obj, form, change):
        # The admin checked has_add/change_permission already; this re-asks the same module (defence in depth).
        authz.require(request.user, "knowledge.edit" if change else "knowledge.create", obj if change else None)
        if not change and obj.owner_id is None:
            obj.owner = request.user
        super().save_model(request, obj, form, change)
        if change and {"chunk_tokens", "chunk_overlap"} & set(form.changed_data):
            count = services.knowledge_base_rechunk(knowledge_base=obj)
            messages.info(request, _("Chunk sizes changed: %(count)d document(s) queued for re-chunking.") % {"count": count})
        elif change and "user_dictionary" in form.changed_data:
            services.index_rebuild_enqueue(obj.pk)
            messages.info(request, _("User dictionary changed: the index is being rebuilt with it."))
        if change and form.model_changed:
            services.knowledge_base_reembed(knowledge_base=obj)
            messages.info(request, _("Embedding model changed: every chunk is being re-embedded in the background; "
                                     "searches use the current index until the new version is active."))
        elif change and form.auto_enabled:
            embedding_model_auto_enabled(knowledge_base=obj)
            messages.info(request, _("The embedding model is chosen automatically again: the documents' language "
                                     "decides (a switch re-embeds in the background)."))

    def delete_model(self, request, obj):
        services.knowledge_base_delete(user=request.user, knowledge_base=obj)

    def delete_queryset(self, request, queryset):
        for kb in queryset:
            services.knowledge_base_delete(user=request.user, knowledge_base=kb)

    @admin.action(description=_("Rebuild the index of selected knowledge bases"))
    def rebuild_indexes(self, request, queryset):
        for kb in queryset:
            services.index_rebuild_enqueue(kb.pk, force=True)
        messages.success(request, _("Index rebuild queued for %(count)d knowledge base(s).") % {"count": queryset.count()})

    @admin.action(description=_("Re-ingest every document of selected knowledge bases"))
    def reindex_documents(self, request, queryset):
        documents = Document.objects.filter(knowledge_base__in=queryset, deleted_at__isnull=True)
        count = services.document_reindex(documents=documents.select_related("knowledge_base"), user=request.user)
        messages.success(request, _("%(count)d document(s) queued for re-ingestion.") % {"count": count})

    # -- extra pages ---------------------------------------------------------------------------

    def get_urls(self):
        extra = [
            path("<int:kb_id>/test-retrieval/", self.admin_site.admin_view(self.test_retrieval_view),
                 name="knowledge_knowledgebase_test_retrieval"),
            path("<int:kb_id>/rebuild/", self.admin_site.admin_view(self.rebuild_view),
                 name="knowledge_knowledgebase_rebuild"),
        ]
        return extra + super().get_urls()

    def rebuild_view(self, request, kb_id: int):
        kb = get_object_or_404(KnowledgeBase, pk=kb_id)
        if request.method != "POST" or not self.has_change_permission(request, kb):
            return HttpResponseRedirect(reverse("admin:knowledge_knowledgebase_change", args=[kb.pk]))
        services.index_rebuild_enqueue(kb.pk, force=True)
        messages.success(request, _("Index rebuild of “%(kb)s” queued.") % {"kb": kb})
        return HttpResponseRedirect(reverse("admin:knowledge_knowledgebase_change", args=[kb.pk]))

    def test_retrieval_view(self, request, kb_id: int):
        kb = get_object_or_404(KnowledgeBase, pk=kb_id)
        if not self.has_view_permission(request, kb):
            return HttpResponseRedirect(reverse("admin:index"))
        form = TestRetrievalForm(request.GET or None)
        results, error = None, None
        if form.is_valid():
            try:
                results = selectors.chunks_retrieve(user=request.user, query=form.cleaned_data["q"],
                                                    knowledge_bases=[kb.pk], top_k=form.cleaned_data["top_k"],
                                                    mode=form.cleaned_data["mode"])
            except ApplicationError as exc:
                error = f"{exc.code}: {exc.message}"
        active = IndexVersion.objects.filter(knowledge_base=kb, status=IndexVersion.Status.ACTIVE).first()
        context = {
            **self.admin_site.each_context(request), "opts": self.model._meta, "original": kb, "kb": kb,
            "title": _("Test retrieval · %(kb)s") % {"kb": kb}, "form": form, "results": results, "error": error, "active": active,
        }
        return TemplateResponse(request, "admin/knowledge/test_retrieval.html", context)


class ChunkInline(admin.TabularInline):
    model = Chunk
    extra = 0
    max_num = 0
    can_delete = False
    fields = ["position", "page", "heading", "token_count", "char_span", "preview"]
    readonly_fields = fields
    verbose_name_plural = _("Chunks (read-only preview)")

    def has_view_permission(self, request, obj=None) -> bool:  # obj: the document being shown
        return obj is None or authz.can(request.user, "knowledge.edit", obj.knowledge_base)
    classes = ["collapse"]

    def get_queryset(self, request):
        return super().get_queryset(request).filter(superseded_at__isnull=True).order_by("position")

    @admin.display(description=_("heading path"))
    def heading(self, obj):
        return " › ".join(obj.heading_path or [])

    @admin.display(description=_("characters"))
    def char_span(self, obj):
        return f"{obj.char_start}–{obj.char_end}"

    @admin.display(description=_("text"))
    def preview(self, obj):
        return format_html('<div style="max-width:60em;white-space:pre-wrap">{}</div>',
                           Truncator(obj.text).chars(600))


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    form = DocumentAdminForm
    list_display = ["display_title", "knowledge_base", "detected_type", "status_badge", "error", "chunk_count",
                    "version", "size", "updated_by", "updated_at"]
    list_filter = ["status", "knowledge_base", "detected_type", "error_code"]
    search_fields = ["title", "source_name", "source_url", "sha256"]
    list_select_related = ["knowledge_base", "updated_by"]
    readonly_fields = ["status_badge", "error", "detected_type", "page_count", "size", "sha256", "version",
                       "created_by", "created_at", "updated_by", "updated_at", "ingested_at", "ingest_attempts",
                       "source_link"]
    fieldsets = [
        (None, {"fields": ["knowledge_base", "title", "file", "source_url"]}),
        (_("Ingestion"), {"fields": ["status_badge", "error", "detected_type", "page_count", "size", "sha256",
                                  "version", "ingested_at", "ingest_attempts", "source_link"]}),
        (_("History"), {"fields": ["created_by", "created_at", "updated_by", "updated_at"]}),
    ]
    inlines = [ChunkInline]
    actions = ["reindex", "delete_documents"]

    # A document belongs to its knowledge base's editors (apps.core.authz); moving one needs both bases.
    def has_module_permission(self, request) -> bool:
        return authz.knowledge_bases_editable(request.user).exists()

    def has_view_permission(self, request, obj=None) -> bool:
        return self.has_change_permission(request, obj)

    def has_add_permission(self, request) -> bool:
        return authz.knowledge_bases_editable(request.user).exists()

    def has_change_permission(self, request, obj=None) -> bool:
        if obj is None:
            return authz.knowledge_bases_editable(request.user).exists()
        return authz.can(request.user, "knowledge.edit", obj.knowledge_base)

    def has_delete_permission(self, request, obj=None) -> bool:
        return self.has_change_permission(request, obj)

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "knowledge_base":
            kwargs["queryset"] = authz.knowledge_bases_editable(request.user)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def get_queryset(self, request):
        return super().get_queryset(request).filter(
            deleted_at__isnull=True, knowledge_base__in=authz.knowledge_bases_editable(request.user)).annotate(
            n_chunks=Count("chunks", filter=Q(chunks__superseded_at__isnull=True)))

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # deletion goes through the service (index rebuild)
        return actions

    @admin.display(description=_("title"), ordering="title")
    def display_title(self, obj):
        return obj.title or obj.source_name or _("Document %(id)s") % {"id": obj.pk}

    @admin.display(description=_("status"), ordering="status")
    def status_badge(self, obj):
        if obj.error_code == "ingest_stuck":  # parked by the sweeper after repeated attempts
            return badge("failed", _("parked"), title=obj.error_message)
        return badge(obj.status, obj.get_status_display(), title=obj.error_message)

    @admin.display(description=_("error"), ordering="error_code")
    def error(self, obj):
        if not obj.error_code:
            return "—"
        return format_html('<code style="color:#c92a2a">{}</code> {}', obj.error_code,
                           Truncator(obj.error_message).chars(160))

    @admin.display(description=_("chunks"), ordering="n_chunks")
    def chunk_count(self, obj):
        return getattr(obj, "n_chunks", None)

    @admin.display(description=_("size"), ordering="size_bytes")
    def size(self, obj):
        from django.template.defaultfilters import filesizeformat

        return filesizeformat(obj.size_bytes)

    @admin.display(description=_("source view"))
    def source_link(self, obj):
        if obj.pk is None or obj.status != Document.Status.READY:
            return "—"
        return format_html('<a href="{}" target="_blank">{}</a>',
                           reverse("knowledge-source", args=[obj.pk]), _("open the parsed text"))

    def save_model(self, request, obj, form, change):
        content_changed = not change or bool({"file", "source_url"} & set(form.changed_data))
        services.document_save(document=obj, user=request.user, content_changed=content_changed)

    def delete_model(self, request, obj):
        services.document_delete(document=obj, user=request.user)

    @admin.action(description=_("Re-ingest selected documents"))
    def reindex(self, request, queryset):
        count = services.document_reindex(documents=queryset.select_related("knowledge_base"), user=request.user)
        messages.success(request, _("%(count)d document(s) queued for re-ingestion.") % {"count": count})

    @admin.action(description=_("Delete selected documents (and update the index)"), permissions=["delete"])
    def delete_documents(self, request, queryset):
        count = 0
        for document in queryset.select_related("knowledge_base"):
            services.document_delete(document=document, user=request.user)
            count += 1
        messages.success(request, _("%(count)d document(s) deleted; the index is being updated.") % {"count": count})

    # -- multi-file upload ----------------------------------------------------------------------

    def get_urls(self):
        extra = [path("upload/", self.admin_site.admin_view(self.upload_view), name="knowledge_document_upload")]
        return extra + super().get_urls()

    def upload_view(self, request):
        if not self.has_add_permission(request):
            return HttpResponseRedirect(reverse("admin:index"))
        knowledge_bases = authz.knowledge_bases_editable(request.user)
        initial = {"knowledge_base": request.GET.get("knowledge_base")}
        form = UploadForm(request.POST or None, request.FILES or None, knowledge_bases=knowledge_bases,
                          initial=initial)
        if request.method == "POST" and form.is_valid():
            kb = form.cleaned_data["knowledge_base"]
            try:
                outcomes = services.documents_upload(knowledge_base=kb, user=request.user,
                                                     files=form.cleaned_data["files"])
            except ApplicationError as exc:
                messages.error(request, f"{exc.code}: {exc.message}")
            else:
                created = [o for o in outcomes if o.status == "created"]
                if created:
                    messages.success(request, _("%(count)d file(s) uploaded to “%(kb)s”; ingestion has started.")
                                     % {"count": len(created), "kb": kb})
                for outcome in outcomes:
                    if outcome.status == "duplicate":
                        messages.warning(request, _("%(name)s: identical to “%(document)s”, not added.")
                                         % {"name": outcome.name, "document": outcome.document})
                    elif outcome.status == "rejected":
                        messages.error(request, f"{outcome.name}: {outcome.error_code}: {outcome.error_message}")
                url = reverse("admin:knowledge_document_changelist") + f"?knowledge_base__id__exact={kb.pk}"
                return HttpResponseRedirect(url)
        context = {**self.admin_site.each_context(request), "opts": self.model._meta, "form": form,
                   "title": _("Upload documents")}
        return TemplateResponse(request, "admin/knowledge/upload.html", context)


@admin.register(IndexVersion)
class IndexVersionAdmin(admin.ModelAdmin):
    list_display = ["knowledge_base", "version", "status_badge", "embedding", "progress", "build_kind",
                    "segment_count", "chunk_count", "document_count", "written_count", "tombstone_count", "dense_kind",
                    "encoded_count", "build_seconds", "created_at", "activated_at", "retired_at"]
    list_filter = ["status", "knowledge_base"]
    list_select_related = ["knowledge_base"]

    def has_module_permission(self, request) -> bool:
        return _kb_admin_visible(request.user)

    def has_view_permission(self, request, obj=None) -> bool:
        if obj is None:
            return _kb_admin_visible(request.user)
        return (authz.can(request.user, "knowledge.read_all")
                or authz.can(request.user, "knowledge.edit", obj.knowledge_base))

    def get_queryset(self, request):
        qs = super().get_queryset(request)
        if authz.can(request.user, "knowledge.read_all"):
            return qs
        return qs.filter(knowledge_base__in=authz.knowledge_bases_editable(request.user))

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description=_("status"), ordering="status")
    def status_badge(self, obj):
        return badge(obj.status, title=obj.error_message)

    @admin.display(description=_("embedding model"))
    def embedding(self, obj):
        return embedding_label(obj)

    @admin.display(description=_("encoding progress"))
    def progress(self, obj):
        return encode_progress(obj)
