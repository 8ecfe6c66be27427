"""LDAP / Active Directory sign-in on django-auth-ldap, with the same group rules as OpenID Connect.

Configured by environment (settings.py turns ``LDAP_*`` variables into ``AUTH_LDAP_*`` settings). The
user's directory groups (their common names, as django-auth-ldap's group type reports them) go
through :func:`apps.accounts.directory.apply_directory` at every sign-in, so a group removed in the
directory is gone at the next one. Users are linked by their DN through :class:`ExternalIdentity`:
a directory entry whose user name equals an existing local account that was never linked is
refused (unless ``LDAP_LINK_EXISTING_USERS`` is on), so nobody who can create entries in the
directory gets a local administrator's account.
"""
from __future__ import annotations

import logging

from django.conf import settings
from django_auth_ldap.backend import LDAPBackend

from . import directory

logger = logging.getLogger(__name__)


def enabled() -> bool:
    return bool(settings.AUTH_LDAP_SERVER_URI)


def provider_id() -> str:
    return f"ldap:{settings.AUTH_LDAP_SERVER_URI}"


class Backend(LDAPBackend):
    def authenticate(self, request, username=None, password=None, **kwargs):
        if not enabled():
            return None
        return super().authenticate(request, username=username, password=password, **kwargs)

    def get_or_build_user(self, username, ldap_user):
        model = self.get_user_model()
        subject = ldap_user.dn.lower()
        user = directory.find_identity_user(provider=provider_id(), subject=subject)
        if user is not None:
            return user, False
        existing = model.objects.filter(username__iexact=username).first()
        if existing is not None:
            if settings.LDAP_LINK_EXISTING_USERS:
                return existing, False
            # Returning a user we then refuse would still let django-auth-ldap save it: fail here.
            logger.warning("ldap sign-in refused: a local account with this user name is not linked to the directory")
            raise ldap_user.AuthenticationFailed("local account not linked to the directory")
        return model(username=directory.free_username(username, user_model=model)), True

    def authenticate_ldap_user(self, ldap_user, password):
        user = super().authenticate_ldap_user(ldap_user, password)
        if user is None:
            return None
        directory.link_identity(user=user, provider=provider_id(), subject=ldap_user.dn.lower())
        groups = sorted(ldap_user.group_names) if settings.AUTH_LDAP_GROUP_SEARCH else []
        changes = directory.apply_directory(user=user, directory_groups=groups, source="ldap")
        logger.info("ldap sign-in", extra={"user_id": user.pk, "groups_added": changes["added"],
                                           "groups_removed": changes["removed"]})
        return user
