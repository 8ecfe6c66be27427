from django.conf import settings
from rest_framework import serializers

from .models import Chunk, Document, KnowledgeBase
from .selectors import MAX_QUERY_CHARS, MODES


class KnowledgeBaseSerializer(serializers.ModelSerializer):
    owner = serializers.SlugRelatedField(slug_field="username", read_only=True)
    allowed_groups = serializers.PrimaryKeyRelatedField(many=True, read_only=True)
    editor_groups = serializers.PrimaryKeyRelatedField(many=True, read_only=True)
    document_count = serializers.IntegerField(read_only=True, required=False)
    active_version = serializers.IntegerField(read_only=True, required=False, allow_null=True)
    last_build_at = serializers.DateTimeField(read_only=True, required=False, allow_null=True)
    can_edit = serializers.SerializerMethodField()
    embedding_model_reason = serializers.SerializerMethodField()

    class Meta:
        model = KnowledgeBase
        fields = ["id", "slug", "name", "description", "owner", "is_public", "allowed_groups", "editor_groups",
                  "embedding_model", "embedding_model_auto", "embedding_choice", "embedding_model_reason",
                  "chunk_tokens", "chunk_overlap", "fusion", "rrf_k", "dense_weight", "candidates",
                  "mmr_lambda", "use_reranker", "user_dictionary", "document_count", "active_version", "last_build_at",
                  "can_edit", "created_at", "updated_at"]

    def get_embedding_model_reason(self, obj) -> str:
        """Why `embedding_model` (the model in use now) is what it is, in the caller's language."""
        from .model_choice import embedding_choice_reason

        return embedding_choice_reason(obj)

    def get_can_edit(self, obj) -> bool:
        from .selectors import knowledge_base_can_edit

        request = self.context.get("request")
        return bool(request) and knowledge_base_can_edit(user=request.user, knowledge_base=obj)


class KnowledgeBaseWriteSerializer(serializers.Serializer):
    """Input only: validation of values happens in the service (one set of rules for admin and API)."""

    slug = serializers.SlugField(max_length=64)
    name = serializers.CharField(max_length=200)
    description = serializers.CharField(required=False, allow_blank=True)
    is_public = serializers.BooleanField(required=False)
    allowed_group_ids = serializers.ListField(child=serializers.IntegerField(), required=False)
    editor_group_ids = serializers.ListField(child=serializers.IntegerField(), required=False,
                                             help_text="Groups whose members edit this knowledge base.")
    # A key of the installation's model catalog (checked by the service): changing it re-embeds in the background.
    embedding_model = serializers.CharField(
        max_length=64, required=False,
        help_text="`auto` (the default for a new base): chosen by the language of the documents (the multilingual "
                  "model when they hold a meaningful share of Chinese); or a model key, which turns the automatic "
                  "choice off.")
    chunk_tokens = serializers.IntegerField(required=False)
    chunk_overlap = serializers.IntegerField(required=False)
    fusion = serializers.ChoiceField(choices=KnowledgeBase.Fusion.choices, required=False)
    rrf_k = serializers.IntegerField(required=False)
    dense_weight = serializers.FloatField(required=False)
    candidates = serializers.IntegerField(required=False)
    mmr_lambda = serializers.FloatField(required=False, allow_null=True)
    use_reranker = serializers.BooleanField(required=False)
    user_dictionary = serializers.CharField(required=False, allow_blank=True)


class DocumentSerializer(serializers.ModelSerializer):
    knowledge_base = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    knowledge_base_id = serializers.IntegerField(read_only=True)
    chunk_count = serializers.IntegerField(read_only=True, required=False)
    error = serializers.SerializerMethodField()
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    updated_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = Document
        fields = ["id", "knowledge_base", "knowledge_base_id", "title", "source_name", "source_url", "detected_type",
                  "size_bytes", "sha256", "page_count", "status", "error", "version", "chunk_count", "created_by",
                  "updated_by", "created_at", "updated_at", "ingested_at"]

    def get_error(self, obj) -> dict | None:
        if not obj.error_code:
            return None
        return {"code": obj.error_code, "message": obj.error_message}


class ChunkSerializer(serializers.ModelSerializer):
    class Meta:
        model = Chunk
        fields = ["id", "position", "text", "page", "heading_path", "char_start", "char_end", "token_count"]


class DocumentDetailSerializer(DocumentSerializer):
    chunks = serializers.SerializerMethodField()

    class Meta(DocumentSerializer.Meta):
        fields = DocumentSerializer.Meta.fields + ["chunks"]

    def get_chunks(self, obj) -> list[dict]:
        from .selectors import document_chunks

        return ChunkSerializer(document_chunks(document=obj), many=True).data


class DocumentUpdateSerializer(serializers.Serializer):
    knowledge_base = serializers.CharField(required=False, max_length=64,
                                           help_text="Move the document to this knowledge base (id or slug); "
                                                     "you must be an editor of both. Both are re-indexed.")
    title = serializers.CharField(required=False, allow_blank=True, max_length=300)


class DocumentUploadSerializer(serializers.Serializer):
    files = serializers.ListField(child=serializers.FileField(allow_empty_file=True), allow_empty=False,
                                  help_text="One or more files (repeat the multipart field).")


class UploadOutcomeSerializer(serializers.Serializer):
    name = serializers.CharField()
    status = serializers.ChoiceField(choices=["created", "duplicate", "rejected"])
    document_id = serializers.IntegerField(allow_null=True)
    error = serializers.DictField(required=False)


class UploadResultSerializer(serializers.Serializer):
    results = UploadOutcomeSerializer(many=True)
    documents = DocumentSerializer(many=True)


class SearchParamsSerializer(serializers.Serializer):
    """Shape only; the retrieval selector validates values and answers with stable codes."""

    q = serializers.CharField(help_text=f"The query (at most {MAX_QUERY_CHARS} characters).", allow_blank=True)
    kb = serializers.CharField(required=False, help_text="Knowledge base id or slug; repeat or comma-separate "
                                                         "for several. Default: every readable one.")
    top_k = serializers.CharField(required=False, help_text=f"1 to {settings.RETRIEVAL_MAX_TOP_K}, default 8.")
    mode = serializers.CharField(required=False, help_text=f"One of {', '.join(MODES)} (default hybrid).")


class RetrievedChunkSerializer(serializers.Serializer):
    chunk_id = serializers.IntegerField()
    document_id = serializers.IntegerField()
    document_title = serializers.CharField()
    knowledge_base_id = serializers.IntegerField()
    knowledge_base_slug = serializers.CharField()
    text = serializers.CharField()
    page = serializers.IntegerField(allow_null=True)
    heading_path = serializers.ListField(child=serializers.CharField())
    char_start = serializers.IntegerField()
    char_end = serializers.IntegerField()
    score = serializers.FloatField()
    scores = serializers.DictField(child=serializers.FloatField())
    index_version = serializers.IntegerField()
    url = serializers.CharField()


class SearchResponseSerializer(serializers.Serializer):
    query = serializers.CharField()
    mode = serializers.CharField()
    top_k = serializers.IntegerField()
    results = RetrievedChunkSerializer(many=True)
