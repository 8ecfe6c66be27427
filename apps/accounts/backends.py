"""Local password sign-in, which an operator can limit to superusers once single sign-on is in place."""
from __future__ import annotations

from django.conf import settings
from django.contrib.auth.backends import ModelBackend


class PasswordBackend(ModelBackend):
    """Django's ModelBackend (permissions from groups) with ``PASSWORD_LOGIN`` = ``all`` | ``superusers``.

    With ``superusers``, only superusers may sign in with a local password (the break-glass account
    when the identity provider is down); everyone else signs in through the directory. Permission
    checks are unchanged: they apply to users however they signed in.
    """

    def authenticate(self, request, username=None, password=None, **kwargs):
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is not None and settings.PASSWORD_LOGIN == "superusers" and not user.is_superuser:
            return None
        return user
