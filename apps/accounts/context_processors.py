from django.conf import settings


def sign_in(request) -> dict:
    """What the sign-in pages offer: the single sign-on button and whether passwords are for everyone."""
    return {
        "sso_enabled": bool(settings.OIDC_ISSUER),
        "sso_provider_name": settings.OIDC_PROVIDER_NAME,
        "password_login": settings.PASSWORD_LOGIN,
    }
