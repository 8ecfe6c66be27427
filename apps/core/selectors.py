from django.db.models import QuerySet

from .models import ApiKey


def api_keys_for(*, user) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(user=user)
