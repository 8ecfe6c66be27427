"""Reads for the audit log (filtering, CSV export)."""
from __future__ import annotations

import csv
from typing import Iterable, Iterator

from django.db.models import QuerySet

from apps.core import authz

from .models import AuditEvent

CSV_COLUMNS = ["time", "actor", "source", "action", "model", "object_id", "object", "changes", "request_id"]
# A cell starting with one of these is run as a formula by spreadsheet programs (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _require_audit_reader(user) -> None:
    authz.require(user, "audit.read")


def audit_events_list(*, user, model_label: str | None = None, object_id: str | None = None,
                      actor: str | None = None, action: str | None = None) -> QuerySet[AuditEvent]:
    _require_audit_reader(user)
    qs = AuditEvent.objects.all()
    if model_label:
        qs = qs.filter(model_label__iexact=model_label)
    if object_id:
        qs = qs.filter(object_id=str(object_id))
    if actor:
        qs = qs.filter(actor_label__icontains=actor)
    if action:
        qs = qs.filter(action=action)
    return qs


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


class _Echo:
    def write(self, value: str) -> str:
        return value


def audit_events_csv(*, user, events: Iterable[AuditEvent]) -> Iterator[str]:
    """CSV lines (header first) for `events`, streamed: an export of a year of events stays in constant memory."""
    _require_audit_reader(user)
    writer = csv.writer(_Echo())
    yield writer.writerow(CSV_COLUMNS)
    if isinstance(events, QuerySet):
        events = events.iterator(chunk_size=2000)
    for event in events:
        yield writer.writerow([_cell(v) for v in (
            event.created_at.isoformat(), event.actor_label, event.source, event.action, event.model_label,
            event.object_id, event.object_repr, event.summary, event.request_id,
        )])
