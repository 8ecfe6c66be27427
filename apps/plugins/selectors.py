"""Reads for plugins: the plugin list as operators see it, invocation statistics, tickets."""
from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet
from django.utils import timezone

from .models import PluginInvocation, Ticket
from .services import plugins_snapshot, plugins_sync

# Enough rows for a stable p95 per plugin without loading a busy week into memory.
STATS_MAX_ROWS = 200_000


def plugin_list() -> dict[str, Any]:
    """Every known plugin (discovered or configured) with status and problems, plus modules that failed to load.
    Never includes config values (they may be sensitive) beyond which secret fields are set."""
    plugins_sync()
    snap = plugins_snapshot(need_catalogue=True)
    items = []
    for view in snap.plugins.values():
        meta = view.meta or {}
        items.append({
            "name": view.name, "status": view.status, "enabled": view.enabled,
            "description": meta.get("description", ""), "version": meta.get("version", ""),
            "source": meta.get("source", ""), "ref": meta.get("ref", ""), "scopes": list(view.scopes),
            "intents": sorted({i.intent for i in view.intents()}),
            "stages": sorted({h["stage"] for h in meta.get("hooks", []) if h["stage"] != "intent"}),
            "allowed_groups": sorted(view.groups) if view.groups is not None else None,
            "allowed_hosts": view.allowed_hosts, "secrets_set": view.secrets_set,
            "problems": view.problems, "config_version": view.version, "timeout_seconds": view.timeout,
        })
    return {"version": snap.version, "plugins": items, "load_errors": snap.load_errors}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def invocation_stats(*, days: int | None = None) -> list[dict[str, Any]]:
    """Per plugin over the last `days`: counts by outcome, success rate, mean and p95 duration (ms)."""
    days = days or settings.PLUGIN_STATS_WINDOW_DAYS
    since = timezone.now() - timedelta(days=days)
    rows = (PluginInvocation.objects.filter(created_at__gte=since).order_by("-created_at")
            .values_list("plugin", "outcome", "duration_ms")[:STATS_MAX_ROWS])
    by_plugin: dict[str, dict[str, Any]] = {}
    for plugin, outcome, duration in rows:
        entry = by_plugin.setdefault(plugin, {"plugin": plugin, "total": 0, "ok": 0, "error": 0, "timeout": 0,
                                              "denied": 0, "_durations": []})
        entry["total"] += 1
        entry[outcome] = entry.get(outcome, 0) + 1
        if outcome != "denied":  # a refused call never ran; its zero duration would flatter the p95
            entry["_durations"].append(duration)
    out = []
    for entry in sorted(by_plugin.values(), key=lambda e: e["plugin"]):
        durations = entry.pop("_durations")
        entry["success_rate"] = entry["ok"] / entry["total"] if entry["total"] else None
        entry["p95_ms"] = percentile(durations, 95)
        entry["mean_ms"] = sum(durations) / len(durations) if durations else None
        entry["days"] = days
        out.append(entry)
    return out


def tickets_for(*, user: AbstractBaseUser) -> QuerySet[Ticket]:
    """A user's own tickets; staff see all."""
    qs = Ticket.objects.select_related("user", "assignee")
    return qs if user.is_staff else qs.filter(user=user)
