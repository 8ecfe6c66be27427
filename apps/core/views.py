from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import APIView

from .selectors import api_keys_for
from .serializers import ApiKeyCreateSerializer, ApiKeyIssuedSerializer, ApiKeySerializer, UserSerializer
from .services import api_key_create, api_key_revoke


class MeView(APIView):
    api_key_scope = ""  # any key may ask whose it is
    @extend_schema(responses=UserSerializer, summary="The authenticated user")
    def get(self, request):
        return Response(UserSerializer(request.user).data)


class ApiKeyListCreateView(APIView):
    api_key_scope = "keys"

    @extend_schema(responses=ApiKeySerializer(many=True), summary="Your API keys (secrets are never shown again)")
    def get(self, request):
        return Response(ApiKeySerializer(api_keys_for(user=request.user), many=True).data)

    @extend_schema(request=ApiKeyCreateSerializer, responses={201: ApiKeyIssuedSerializer}, summary="Create an API key for yourself",
                   description="With an API key (scope `keys`), the new key gets at most that key's scopes and "
                               "expiry, and is revoked with it.")
    def post(self, request):
        params = ApiKeyCreateSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        # Authenticated with a key: the new key is minted from it (never wider, never longer-lived).
        issued = api_key_create(user=request.user, parent=getattr(request, "api_key", None), **params.validated_data)
        data = ApiKeySerializer(issued.api_key).data | {"key": issued.raw_key}
        return Response(data, status=status.HTTP_201_CREATED)


class ApiKeyRevokeView(APIView):
    api_key_scope = "keys"

    @extend_schema(request=None, responses=ApiKeySerializer, summary="Revoke an API key (idempotent)")
    def post(self, request, key_id: int):
        return Response(ApiKeySerializer(api_key_revoke(user=request.user, key_id=key_id)).data)
