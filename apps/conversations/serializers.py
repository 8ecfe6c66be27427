from rest_framework import serializers

from .models import Conversation, Feedback, Message


class ChatRequestSerializer(serializers.Serializer):
    message = serializers.CharField(trim_whitespace=True,
                                    help_text="The user's message (at most 8000 characters).")
    session_id = serializers.CharField(required=False, allow_null=True,
                                       help_text="Continue this conversation; omit to start a new one. A new, "
                                                 "well-formed id (8-64 of A-Z a-z 0-9 - _) starts a conversation "
                                                 "with that id.")
    knowledge_bases = serializers.ListField(child=serializers.CharField(max_length=64), required=False,
                                            allow_null=True, max_length=20,
                                            help_text="Slugs or ids to search; omit for every knowledge base "
                                                      "you can read.")
    stream = serializers.BooleanField(required=False, default=False,
                                      help_text="Stream the answer as server-sent events (also with Accept: "
                                                "text/event-stream): turn, token..., then answer or error.")


class ChunkCitationSerializer(serializers.Serializer):
    n = serializers.IntegerField(help_text="The [n] marker in the answer.")
    type = serializers.ChoiceField(choices=["chunk", "plugin"])
    document_id = serializers.IntegerField(required=False)
    document_title = serializers.CharField(required=False)
    chunk_id = serializers.IntegerField(required=False)
    page = serializers.IntegerField(required=False, allow_null=True)
    heading = serializers.CharField(required=False, allow_blank=True)
    snippet = serializers.CharField()
    score = serializers.FloatField(required=False, allow_null=True)
    url = serializers.CharField(allow_null=True, help_text="Source view: /sources/<document_id>/?chunk=<chunk_id>.")
    plugin = serializers.CharField(required=False, help_text="Plugin citations only.")
    title = serializers.CharField(required=False, help_text="Plugin citations only.")


class PluginResultSerializer(serializers.Serializer):
    plugin = serializers.CharField()
    intent = serializers.CharField(allow_null=True)
    ok = serializers.BooleanField()
    title = serializers.CharField()
    content = serializers.CharField()
    data = serializers.DictField()
    error_code = serializers.CharField(allow_null=True)
    url = serializers.CharField(allow_null=True)


class UsageSerializer(serializers.Serializer):
    generator = serializers.CharField()
    model = serializers.CharField(allow_blank=True)
    prompt_tokens = serializers.IntegerField(allow_null=True)
    completion_tokens = serializers.IntegerField(allow_null=True)
    total_tokens = serializers.IntegerField()
    latency_ms = serializers.FloatField()


class ChatResponseSerializer(serializers.Serializer):
    session_id = serializers.CharField()
    message_id = serializers.IntegerField(help_text="The assistant message (feedback goes here).")
    answer = serializers.CharField()
    citations = ChunkCitationSerializer(many=True)
    plugin_results = PluginResultSerializer(many=True)
    usage = UsageSerializer()


class ConversationSerializer(serializers.ModelSerializer):
    message_count = serializers.IntegerField(read_only=True, required=False)

    class Meta:
        model = Conversation
        fields = ["session_id", "title", "archived", "created_at", "updated_at", "message_count"]


class ConversationUpdateSerializer(serializers.Serializer):
    title = serializers.CharField(required=False, max_length=200, allow_blank=True, trim_whitespace=True)
    archived = serializers.BooleanField(required=False)


class MessageSerializer(serializers.ModelSerializer):
    feedback = serializers.SerializerMethodField()

    class Meta:
        model = Message
        fields = ["id", "role", "content", "citations", "plugin_results", "generator", "prompt_tokens",
                  "completion_tokens", "latency_ms", "error_code", "status", "turn_id", "created_at", "feedback"]

    def get_feedback(self, message) -> str | None:
        """Your rating of this answer ("up", "down"), if any."""
        user = self.context.get("user")
        for fb in message.feedback.all():
            if user is not None and fb.user_id == user.pk:
                return fb.rating
        return None


class FeedbackRequestSerializer(serializers.Serializer):
    rating = serializers.ChoiceField(choices=Feedback.Rating.values)
    comment = serializers.CharField(required=False, allow_blank=True, max_length=4000, default="")


class FeedbackSerializer(serializers.ModelSerializer):
    class Meta:
        model = Feedback
        fields = ["id", "message", "rating", "comment", "created_at", "updated_at"]
