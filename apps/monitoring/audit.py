"""Audit log: every change to the models named in settings.AUDITED_MODELS, wherever it comes from.

Driven by model signals, so the admin, the API, commands and tasks are covered without their code
knowing: pre_save reads the stored row, post_save/post_delete write the difference, m2m_changed
records group and permission changes. Rows are written in the same transaction as the change.

Who: the authenticated user of the request being served (resolved at write time, because DRF
authenticates inside the view), else an explicit label bound with `audit_actor("command:...")`, the
Celery task (bound by apps.monitoring.celery_signals), the management command being run, or "system".

Not covered, by nature of signals: QuerySet.update() and bulk_create(). Code doing bulk changes to
audited models calls `audit_record()` itself.
"""
from __future__ import annotations

import datetime as dt
import decimal
import logging
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from django.apps import apps
from django.conf import settings
from django.db import models
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_save

from apps.core.logging import MASK, SECRET_FIELD_RE, actor_var, current_request_var, redact, request_id_var

from .metrics import audit_events_total

logger = logging.getLogger(__name__)

MAX_VALUE_CHARS = 200
ALWAYS_IGNORED = frozenset({"last_login", "last_used_at"})


@dataclass(frozen=True)
class Actor:
    user: Any  # a user instance or None
    label: str
    source: str


def _source_for_path(path: str) -> str:
    if path.startswith("/admin/"):
        return "admin"
    if path.startswith("/api/"):
        return "api"
    return "web"


def _command_name() -> str | None:
    argv = sys.argv or []
    if len(argv) >= 2 and argv[0].rsplit("/", 1)[-1] in ("manage.py", "django-admin", "django-admin.py"):
        return argv[1]
    return None


def current_actor() -> Actor:
    request = current_request_var.get()
    explicit = actor_var.get()
    if request is not None:
        user = getattr(request, "user", None)
        if user is not None and getattr(user, "is_authenticated", False):
            label = user.get_username()
            api_key = getattr(request, "auth", None)
            prefix = getattr(api_key, "prefix", None)
            if prefix:
                label = f"{label} (API key {prefix})"
            return Actor(user, label[:200], _source_for_path(request.path))
        if explicit is None:
            return Actor(None, "anonymous", _source_for_path(request.path))
    if explicit:
        source = "command" if explicit.startswith("command:") else "task" if "task:" in explicit else "system"
        return Actor(None, explicit[:200], source)
    command = _command_name()
    if command:
        return Actor(None, f"command:{command}", "command")
    return Actor(None, "system", "system")


@contextmanager
def audit_actor(label: str) -> Iterator[None]:
    """Attribute the changes made inside the block to `label` (e.g. "command:archive_conversations")."""
    token = actor_var.set(label)
    try:
        yield
    finally:
        actor_var.reset(token)


# --- values ---------------------------------------------------------------------------------

def _abbreviate(text: str) -> str:
    text = redact(text)
    if len(text) <= MAX_VALUE_CHARS:
        return text
    return f"{text[:MAX_VALUE_CHARS]}… ({len(text)} chars)"


def _plain(value: Any) -> Any:
    """A JSON-safe, short, secret-free rendering of one field value."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID, dt.timedelta)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(bytes(value))} bytes>"
    if isinstance(value, models.fields.files.FieldFile):
        return value.name or ""
    if isinstance(value, dict):
        return {str(k): (MASK if SECRET_FIELD_RE.search(str(k)) and v not in (None, "") else _plain(v))
                for k, v in list(value.items())[:50]}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
        out = [_plain(v) for v in items[:50]]
        if len(items) > 50:
            out.append(f"… ({len(items)} items)")
        return out
    return _abbreviate(str(value))


def _masked(name: str, value: Any) -> Any:
    if SECRET_FIELD_RE.search(name):
        return MASK if value not in (None, "") else value
    return _plain(value)


def _ignored_fields(model: type[models.Model]) -> set[str]:
    configured = getattr(settings, "AUDIT_IGNORED_FIELDS", {}) or {}
    names = set(ALWAYS_IGNORED) | set(configured.get("*", [])) | set(configured.get(model._meta.label, []))
    for field in model._meta.concrete_fields:
        # Auto-stamped and non-editable fields are bookkeeping the system does, not changes someone made.
        if getattr(field, "auto_now", False) or (not field.editable and not field.primary_key):
            names.add(field.name)
    return names


def _tracked_fields(model: type[models.Model]) -> list[models.Field]:
    ignored = _ignored_fields(model)
    return [f for f in model._meta.concrete_fields if f.name not in ignored and not f.primary_key]


def snapshot(instance: models.Model, fields: Iterable[models.Field] | None = None) -> dict[str, Any]:
    """Raw values (foreign keys as ids) of the tracked fields; compare these, render with `_masked`."""
    fields = list(fields) if fields is not None else _tracked_fields(type(instance))
    return {f.name: f.value_from_object(instance) for f in fields}


def _stored_snapshot(instance: models.Model, update_fields: Iterable[str] | None) -> dict[str, Any] | None:
    if instance.pk is None:
        return None
    fields = _tracked_fields(type(instance))
    if update_fields is not None:
        wanted = set(update_fields)
        fields = [f for f in fields if f.name in wanted or f.attname in wanted]
    if not fields:
        return {}
    stored = type(instance)._base_manager.filter(pk=instance.pk).values(*[f.attname for f in fields]).first()
    if stored is None:
        return None
    return {f.name: stored[f.attname] for f in fields}


def _comparable(value: Any) -> Any:
    if isinstance(value, models.fields.files.FieldFile):
        return value.name or ""
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def _repr(instance: models.Model) -> str:
    try:
        return redact(str(instance))[:200]
    except Exception:  # __str__ touching a deleted relation must not break the write
        return f"{instance._meta.label} {instance.pk}"


def summarize(changes: dict[str, Any]) -> str:
    parts = []
    for name, change in changes.items():
        if "added" in change or "removed" in change:
            bits = []
            if change.get("added"):
                bits.append("+" + ", +".join(map(str, change["added"])))
            if change.get("removed"):
                bits.append("-" + ", -".join(map(str, change["removed"])))
            parts.append(f"{name}: {' '.join(bits)}")
        elif "before" in change and "after" in change:
            parts.append(f"{name}: {change['before']!r} → {change['after']!r}")
        elif "after" in change:
            parts.append(f"{name}={change['after']!r}")
        else:
            parts.append(f"{name} was {change.get('before')!r}")
    return "; ".join(parts)


# --- writing --------------------------------------------------------------------------------

def audit_record(*, action: str, model_label: str, object_id: Any, object_repr: str,
                 changes: dict[str, Any] | None = None, actor: Actor | None = None):
    """Write one audit row (in the caller's transaction). For changes signals cannot see."""
    AuditEvent = apps.get_model("monitoring", "AuditEvent")
    actor = actor or current_actor()
    changes = changes or {}
    event = AuditEvent.objects.create(
        actor=actor.user if getattr(actor.user, "pk", None) else None,
        actor_label=actor.label, source=actor.source, action=action, model_label=model_label,
        object_id=str(object_id)[:64], object_repr=(object_repr or "")[:200], changes=changes,
        summary=summarize(changes), request_id=request_id_var.get() if request_id_var.get() != "-" else "",
    )
    audit_events_total.labels(model_label, action).inc()
    return event


def _on_pre_save(sender, instance, raw=False, update_fields=None, **kwargs) -> None:
    try:
        instance._audit_before = _stored_snapshot(instance, update_fields)
    except Exception:
        logger.exception("audit: could not read the stored row", extra={"model": sender._meta.label})
        instance._audit_before = None


def _on_post_save(sender, instance, created=False, raw=False, update_fields=None, **kwargs) -> None:
    before = getattr(instance, "_audit_before", None)
    instance.__dict__.pop("_audit_before", None)
    fields = _tracked_fields(sender)
    if update_fields is not None:
        wanted = set(update_fields)
        fields = [f for f in fields if f.name in wanted or f.attname in wanted]
    after = snapshot(instance, fields)
    if created or before is None:
        changes = {name: {"after": _masked(name, value)} for name, value in after.items()
                   if value not in (None, "", [], {})}
        audit_record(action="create", model_label=sender._meta.label, object_id=instance.pk,
                     object_repr=_repr(instance), changes=changes)
        return
    changes = {}
    for name, value in after.items():
        if name in before and _comparable(before[name]) != _comparable(value):
            changes[name] = {"before": _masked(name, before[name]), "after": _masked(name, value)}
    if changes:
        audit_record(action="update", model_label=sender._meta.label, object_id=instance.pk,
                     object_repr=_repr(instance), changes=changes)


def _on_post_delete(sender, instance, **kwargs) -> None:
    changes = {name: {"before": _masked(name, value)} for name, value in snapshot(instance).items()
               if value not in (None, "", [], {})}
    audit_record(action="delete", model_label=sender._meta.label, object_id=instance.pk,
                 object_repr=_repr(instance), changes=changes)


def _m2m_receiver(owner_model: type[models.Model], field: models.ManyToManyField):
    """A receiver recording changes to `owner_model.field`, always on the forward side ("user.groups")."""
    related_model = field.remote_field.model

    def receiver(sender, instance, action, reverse, pk_set=None, **kwargs):
        if action == "pre_clear":
            # After the clear the link rows are gone: remember what is about to be removed.
            if reverse:
                accessor = field.remote_field.get_accessor_name()
                instance._audit_cleared = list(getattr(instance, accessor).values_list("pk", flat=True))
            else:
                instance._audit_cleared = list(getattr(instance, field.name).values_list("pk", flat=True))
            return
        if action not in ("post_add", "post_remove", "post_clear"):
            return
        key = "added" if action == "post_add" else "removed"
        if action == "post_clear":
            pk_set = instance.__dict__.pop("_audit_cleared", None)
        if not pk_set:
            return
        if reverse:
            owners, others = list(owner_model._base_manager.filter(pk__in=pk_set)), [instance]
        else:
            owners, others = [instance], list(related_model._base_manager.filter(pk__in=pk_set))
        _record_m2m(owner_model, field, owners, others, key)

    return receiver


def _record_m2m(model, field, owners: list[models.Model], others: list[models.Model], key: str) -> None:
    if not owners or not others:
        return
    names = sorted(_repr(o) for o in others)
    for owner in owners:
        changes = {field.name: {key: names}}
        audit_record(action="update", model_label=model._meta.label, object_id=owner.pk,
                     object_repr=_repr(owner), changes=changes)


_connected: set[str] = set()


def audited_models() -> list[type[models.Model]]:
    """The audited models that exist in this deployment (labels of apps not installed are skipped)."""
    found = []
    for label in getattr(settings, "AUDITED_MODELS", []):
        try:
            found.append(apps.get_model(label))
        except (LookupError, ValueError):
            logger.debug("audit: model %s is not installed; not audited", label)
    return found


def connect_audit_signals() -> None:
    """Connect the receivers for every audited model. Idempotent; called from AppConfig.ready()."""
    for model in audited_models():
        label = model._meta.label
        if label in _connected:
            continue
        uid = f"kotaemon-audit-{label}"
        pre_save.connect(_on_pre_save, sender=model, weak=False, dispatch_uid=f"{uid}-pre")
        post_save.connect(_on_post_save, sender=model, weak=False, dispatch_uid=f"{uid}-post")
        post_delete.connect(_on_post_delete, sender=model, weak=False, dispatch_uid=f"{uid}-delete")
        for field in model._meta.many_to_many:
            m2m_changed.connect(_m2m_receiver(model, field), sender=field.remote_field.through, weak=False,
                                dispatch_uid=f"{uid}-m2m-{field.name}")
        _connected.add(label)
