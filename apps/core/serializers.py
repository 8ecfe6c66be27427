from rest_framework import serializers

from .models import SCOPES, ApiKey


class UserSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField()
    email = serializers.EmailField()
    is_staff = serializers.BooleanField()
    groups = serializers.SerializerMethodField()

    def get_groups(self, user) -> list[str]:
        return sorted(g.name for g in user.groups.all())


class ApiKeySerializer(serializers.ModelSerializer):
    status = serializers.CharField(read_only=True)
    scopes = serializers.ListField(child=serializers.CharField(), read_only=True)
    parent = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True,
                                                help_text="The key this key was created with, if any.")

    class Meta:
        model = ApiKey
        fields = ["id", "name", "prefix", "status", "scopes", "parent", "created_at", "expires_at", "revoked_at",
                  "last_used_at"]


class ApiKeyCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")
    expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None)
    scopes = serializers.ListField(child=serializers.ChoiceField(choices=list(SCOPES)), required=False,
                                   allow_empty=False, default=None,
                                   help_text="Default: every scope (or, with an API key, that key's scopes).")


class ApiKeyIssuedSerializer(ApiKeySerializer):
    key = serializers.CharField(read_only=True, help_text="The secret key. Shown only in this response.")

    class Meta(ApiKeySerializer.Meta):
        fields = ApiKeySerializer.Meta.fields + ["key"]
