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
    timeout_seconds = serializers.FloatField(required=False, allow_null=True)


class TicketSerializer(serializers.ModelSerializer):
    class Meta:
        model = Ticket
        fields = ["id", "number", "subject", "status", "priority", "conversation_id", "created_at", "updated_at"]
