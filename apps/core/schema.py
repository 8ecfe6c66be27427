from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "apps.core.authentication.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"}


def paginated(serializer_class):
    """The OpenAPI shape of a LimitOffsetPagination page of `serializer_class` (views that paginate by hand
    must say so, or the schema promises a bare array)."""
    from rest_framework import serializers

    name = serializer_class.__name__.removesuffix("Serializer")
    return type(f"Paginated{name}ListSerializer", (serializers.Serializer,), {
        "count": serializers.IntegerField(),
        "next": serializers.URLField(allow_null=True),
        "previous": serializers.URLField(allow_null=True),
        "results": serializer_class(many=True),
        "__module__": __name__,
    })


def server_sent_event():
    """One event of a text/event-stream response, as clients (and schemathesis) parse it."""
    from rest_framework import serializers

    return type("ServerSentEventSerializer", (serializers.Serializer,), {
        "id": serializers.CharField(required=False),
        "event": serializers.CharField(required=False),
        "data": serializers.CharField(help_text="JSON text of the event's payload."),
        "__module__": __name__,
    })
