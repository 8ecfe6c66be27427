from rest_framework import serializers

from .models import Ticket


class PluginConfigUpdateSerializer(serializers.Serializer):
    enabled = serializers.BooleanField(required=False)
    config = serializers.JSONField(required=False)
    secrets = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False,
                                    help_text="Write-only; blank keeps the stored value.")
    clear_secrets = serializers.ListField(child=serializers.CharField(), required=False)
    allowed_groups = serializers.ListField(child=serializers.CharField(), required=False,
                                           help_text="Group names; [] means every signed-in user.")
    allowed_hosts = serializers.ListField(child=serializers.CharField(), required=False)
    granted_scopes = serializers.ListField(child=serializers.CharField(), required=False,
                                           help_text="Sensitive scopes granted explicitly, e.g. knowledge:read.")
    timeout_seconds = serializers.FloatField(required=False, allow_null=True)


class TicketSerializer(serializers.ModelSerializer):
    # Plain strings in the schema: a choice enum named "status" would collide with other apps' enums.
    status = serializers.CharField(read_only=True, help_text="open | in_progress | resolved | closed")
    priority = serializers.CharField(read_only=True, help_text="low | normal | high | urgent")

    class Meta:
        model = Ticket
        fields = ["id", "number", "subject", "status", "priority", "conversation_id", "created_at", "updated_at"]
