from rest_framework.throttling import SimpleRateThrottle


class UserOrKeyRateThrottle(SimpleRateThrottle):
    """Rate limit per API key when one is used, else per user, else per client address."""

    scope = "user"

    def get_cache_key(self, request, view):
        api_key = getattr(request, "api_key", None)
        if api_key is not None:
            ident = f"key:{api_key.pk}"
        elif request.user and request.user.is_authenticated:
            ident = f"user:{request.user.pk}"
        else:
            ident = f"ip:{self.get_ident(request)}"
        return self.cache_format % {"scope": self.scope, "ident": ident}


class ChatRateThrottle(UserOrKeyRateThrottle):
    scope = "chat"
