"""Reads for plugins: the plugin list as operators see it, invocation statistics, tickets."""
from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.translation import gettext

from apps.core import authz

from .models import PluginInvocation, Ticket
from .services import ensure_plugin_admin, plugins_snapshot, plugins_sync

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
            "declared_scopes": list(view.declared_scopes), "granted_scopes": sorted(view.granted_scopes),
            "intents": sorted({i.intent for i in view.intents()}),
            "stages": sorted({h["stage"] for h in meta.get("hooks", []) if h["stage"] != "intent"}),
            "allowed_groups": sorted(view.groups) if view.groups is not None else None,
            "allowed_hosts": view.allowed_hosts, "secrets_set": view.secrets_set,
            "problems": view.problems, "config_version": view.version, "timeout_seconds": view.timeout,
        })
    return {"version": snap.version, "plugins": items, "load_errors": snap.load_errors}


def plugin_list_for(*, user: AbstractBaseUser) -> dict[str, Any]:
    ensure_plugin_admin(user)
    return plugin_list()


def invocation_stats_for(*, user: AbstractBaseUser, days: int | None = None) -> list[dict[str, Any]]:
    ensure_plugin_admin(user)
    return invocation_stats(days=days)


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
    """A user's own tickets; support agents (apps.core.authz) see all."""
    qs = Ticket.objects.select_related("user", "assignee")
    return qs if authz.can(user, "tickets.view_all") else qs.filter(user=user)


NEAR_DUPLICATE = 0.85


def evaluation_router(*, include_all_installed: bool = True):
    """The router the evaluation measures: every installed plugin's fixed intents (enabled or not) plus
    the admin-configured intents of enabled plugins, with the production thresholds."""
    from .services import build_router

    snap = plugins_snapshot(need_catalogue=True)
    intents = []
    for view in snap.plugins.values():
        if view.meta is None:
            continue
        for spec in view.intents():
            configurable = any(h.get("configurable") and h["method"] == spec.method for h in view.hooks("intent"))
            if view.active or (include_all_installed and not configurable):
                intents.append(spec)
    return build_router(intents)


def router_evaluation(labelled: dict[str, list[str]]) -> dict[str, Any]:
    """Accuracy of the intent router on labelled utterances ({intent or "none": [...]}).

    Also reports how many utterances are near-duplicates (cosine > 0.85) of an example or anchor, and
    the accuracy without them, so a held-out set that leans on copies of the examples is visible.
    """
    import numpy as np

    from .router import evaluate

    labelled = {k: v for k, v in labelled.items() if not k.startswith("_")}
    router = evaluation_router()
    unknown = sorted(set(labelled) - set(router.intents) - {"none"})
    if unknown:
        from apps.core.errors import ApplicationError

        raise ApplicationError("unknown_intents", gettext("The data names intents no installed plugin has: %(unknown)s")
                                                  % {"unknown": unknown},
                               details={"unknown": unknown, "available": router.intents})
    report = evaluate(router, labelled)
    texts = [t for items in labelled.values() for t in items]
    example_matrix = router._examples_matrix()
    vectors = router._encode(texts)
    nearest = (np.asarray(vectors) @ example_matrix.T).max(axis=1) if len(texts) else np.zeros(0)
    near = {t for t, s in zip(texts, nearest) if s > NEAR_DUPLICATE}
    wrong = {m["utterance"] for m in report["mistakes"]}
    kept = [t for t in texts if t not in near]
    report["near_duplicates"] = sorted(near)
    report["accuracy_without_near_duplicates"] = (sum(1 for t in kept if t not in wrong) / len(kept)) if kept else None
    report["settings"] = {"threshold": router.threshold, "margin": router.margin, "top_k": router.top_k,
                          "keyword_bonus": router.keyword_bonus}
    report["intents"] = router.intents
    return report
