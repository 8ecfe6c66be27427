"""Directory groups -> Django groups, the one rule both OpenID Connect and LDAP sign-in use.

Knowledge-base and plugin permissions hang off Django groups (a base's allowed groups, the roles of
apps/core/authz.py). A sign-in through a directory maps the user's directory groups to Django groups
by the configured rules and makes the user's directory-managed groups exactly that set: a group
removed in the directory is gone at the next sign-in; groups an administrator assigned by hand stay.

Rules (``SSO_GROUP_RULES``): ``pattern=group`` entries separated by ``;`` or new lines. ``pattern`` is a
directory group name or a shell-style glob (``kb-*``), matched without regard to case; ``group`` is the
Django group name, where ``{name}`` stands for the directory group's own name. Examples::

    engineering=kb-engineering; support=handbook-readers; kb-*={name}

``SSO_STAFF_GROUPS`` / ``SSO_SUPERUSER_GROUPS`` (patterns, comma-separated), when set, make the
staff / superuser flags follow the directory at every sign-in.
"""
from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.utils import timezone

from .models import DirectoryGroup, ExternalIdentity

logger = logging.getLogger(__name__)

_MAX_GROUP_NAME = 150  # django.contrib.auth.models.Group.name


@dataclass(frozen=True)
class GroupRule:
    pattern: str
    template: str

    def apply(self, directory_group: str) -> str | None:
        if not fnmatch.fnmatchcase(directory_group.casefold(), self.pattern.casefold()):
            return None
        name = self.template.replace("{name}", directory_group).strip()
        return name[:_MAX_GROUP_NAME] or None


def parse_rules(text: str) -> list[GroupRule]:
    """Parse ``pattern=group`` entries; a malformed entry refuses to start (no silent ignore)."""
    rules = []
    for entry in re.split(r"[;\n]", text or ""):
        entry = entry.strip()
        if not entry:
            continue
        pattern, sep, template = entry.partition("=")
        if not sep or not pattern.strip() or not template.strip():
            raise ImproperlyConfigured(f"SSO_GROUP_RULES: {entry!r} is not of the form pattern=group")
        rules.append(GroupRule(pattern.strip(), template.strip()))
    return rules


def _matches_any(directory_groups: Iterable[str], patterns: Iterable[str]) -> bool:
    patterns = [p.casefold() for p in patterns]
    return any(fnmatch.fnmatchcase(g.casefold(), p) for g in directory_groups for p in patterns)


def mapped_group_names(directory_groups: Iterable[str]) -> set[str]:
    """The Django group names that the configured rules give for these directory groups."""
    rules = parse_rules(settings.SSO_GROUP_RULES)
    names = set()
    for directory_group in directory_groups:
        for rule in rules:
            name = rule.apply(directory_group)
            if name:
                names.add(name)
    return names


def clean_directory_groups(value) -> list[str]:
    """A ``groups`` claim or attribute as a list of names: a list, or one string; anything else: none."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, set)):
        return []
    return sorted({str(v).strip() for v in value if isinstance(v, (str, int)) and str(v).strip()})


@transaction.atomic
def apply_directory(*, user, directory_groups: Iterable[str], source: str) -> dict:
    """Make ``user``'s ``source``-managed groups (and, if configured, staff/superuser) follow the directory.

    Returns what changed, for the audit record: ``{"added": [...], "removed": [...], "flags": {...}}``.
    """
    directory_groups = list(directory_groups)
    wanted = mapped_group_names(directory_groups)
    for name in wanted:
        group, _ = Group.objects.get_or_create(name=name)
        DirectoryGroup.objects.get_or_create(group=group, source=source)
    current = set(user.groups.filter(directory_links__source=source).values_list("name", flat=True))
    added, removed = sorted(wanted - current), sorted(current - wanted)
    if removed:
        user.groups.remove(*Group.objects.filter(name__in=removed))
    if added:
        user.groups.add(*Group.objects.filter(name__in=added))

    flags = {}
    for flag, patterns in (("is_staff", settings.SSO_STAFF_GROUPS), ("is_superuser", settings.SSO_SUPERUSER_GROUPS)):
        if patterns:
            value = _matches_any(directory_groups, patterns)
            if getattr(user, flag) != value:
                setattr(user, flag, value)
                flags[flag] = value
    if flags:
        user.save(update_fields=list(flags))
    return {"added": added, "removed": removed, "flags": flags}


def find_identity_user(*, provider: str, subject: str):
    """The user linked to this external identity, or None."""
    identity = (ExternalIdentity.objects.select_related("user")
                .filter(provider=provider, subject=subject).first())
    return identity.user if identity else None


def link_identity(*, user, provider: str, subject: str) -> None:
    ExternalIdentity.objects.update_or_create(
        provider=provider, subject=subject, defaults={"user": user, "last_login_at": timezone.now()})


_USERNAME_BAD = re.compile(r"[^\w.@+-]+")


def free_username(wanted: str, *, user_model) -> str:
    """``wanted`` made a valid Django user name that nobody has yet (``name``, ``name-2``, ...)."""
    base = _USERNAME_BAD.sub("-", wanted or "").strip("-")[:140] or "user"
    candidate, n = base, 1
    while user_model.objects.filter(username=candidate).exists():
        n += 1
        candidate = f"{base}-{n}"
    return candidate
