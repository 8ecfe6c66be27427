"""Figures for the operations dashboard (staff only).

Cluster-wide figures come from the database (answers, feedback, unanswered questions, answer latency,
tokens and cost, index versions) and the instance registry (instances and the index versions they
hold). Figures only a process knows (retrieval latency by mode, session store hit rate, plugin
outcomes when no invocation table exists) come from this instance's Prometheus registry and are
labelled so; Grafana (deploy/grafana/) shows them across the cluster.

Other apps' models are looked up by label at call time: the dashboard shows what is installed.
"""
from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from django.apps import apps
from django.conf import settings
from django.db.models import Count, OuterRef, Q, Subquery, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone
from django.utils.translation import gettext

from apps.core import authz
from apps.core.errors import ApplicationError

from .metrics import REGISTRY

logger = logging.getLogger(__name__)

RETRIEVAL_HISTOGRAMS = ("kotaemon_knowledge_retrieval_seconds", "kotaemon_retrieval_duration_seconds")
PLUGIN_COUNTERS = ("kotaemon_plugin_invocations_total",)
SESSION_COUNTERS = ("kotaemon_session_store_lookups_total",)
MAX_DAYS = 365
LATENCY_SAMPLE_LIMIT = 100_000
# "denied" is a permission decision working as intended, not a plugin failing.
FAILED_OUTCOMES = {"error", "failure", "failed", "timeout", "crash", "crashed", "killed"}


@dataclass
class Dashboard:
    days: int
    since: dt.datetime
    day_labels: list[str] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    feedback_up: list[int] = field(default_factory=list)
    feedback_down: list[int] = field(default_factory=list)
    unanswered_per_day: list[int] = field(default_factory=list)
    unanswered: list[dict[str, Any]] = field(default_factory=list)
    latency_p50: list[float | None] = field(default_factory=list)
    latency_p95: list[float | None] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    cost_by_model: list[dict[str, Any]] = field(default_factory=list)
    retrieval: list[dict[str, Any]] = field(default_factory=list)
    plugins: list[dict[str, Any]] = field(default_factory=list)
    plugins_source: str = ""
    session_store: list[dict[str, Any]] = field(default_factory=list)
    instances: list[dict[str, Any]] = field(default_factory=list)
    instances_error: str | None = None
    knowledge_bases: list[dict[str, Any]] = field(default_factory=list)
    currency: str = "USD"
    missing: list[str] = field(default_factory=list)

    @property
    def totals(self) -> dict[str, Any]:
        up, down = sum(self.feedback_up), sum(self.feedback_down)
        answers = sum(self.answers)
        return {
            "answers": answers, "feedback_up": up, "feedback_down": down,
            "feedback_up_rate": up / (up + down) if up + down else None,
            "feedback_up_pct": round(100 * up / (up + down)) if up + down else None,
            "unanswered": sum(self.unanswered_per_day),
            "unanswered_rate": sum(self.unanswered_per_day) / answers if answers else None,
            "prompt_tokens": sum(self.prompt_tokens), "completion_tokens": sum(self.completion_tokens),
            "cost": round(sum(row["cost"] for row in self.cost_by_model), 4),
        }


def _model(label: str):
    try:
        return apps.get_model(label)
    except LookupError:
        return None


def parse_days(raw: Any, default: int | None = None) -> int:
    if raw in (None, ""):
        return default or getattr(settings, "DASHBOARD_DAYS", 30)
    try:
        days = int(raw)
    except (TypeError, ValueError):
        days = -1
    if not 1 <= days <= MAX_DAYS:
        raise ApplicationError("invalid_days", gettext("days must be a whole number from 1 to %(max_days)s.")
                                               % {"max_days": MAX_DAYS},
                               details={"days": str(raw)[:20]})
    return days


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 1]) of unsorted values; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def price_for(generator: str) -> dict[str, float]:
    """Price per 1,000 tokens for a generator: by its name, then by LLM_MODEL, then "*"."""
    prices = getattr(settings, "LLM_PRICES", {}) or {}
    for key in (generator, getattr(settings, "LLM_MODEL", "") if generator not in ("extractive", "") else None, "*"):
        if key and key in prices:
            entry = prices[key] or {}
            return {"prompt": float(entry.get("prompt", 0) or 0), "completion": float(entry.get("completion", 0) or 0)}
    return {"prompt": 0.0, "completion": 0.0}


# --- this instance's Prometheus registry -------------------------------------------------------

def _samples(names: tuple[str, ...]) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for family in REGISTRY.collect():
        for sample in family.samples:
            if any(sample.name == n or sample.name.startswith(n + "_") for n in names):
                out.append((sample.name, dict(sample.labels), float(sample.value)))
    return out


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) buckets."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def retrieval_latency() -> list[dict[str, Any]]:
    """p50/p95 (ms) of retrieval by mode on this instance since it started."""
    by_mode: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, float] = defaultdict(float)
    for name, labels, value in _samples(RETRIEVAL_HISTOGRAMS):
        mode = labels.get("mode", "all")
        if name.endswith("_bucket"):
            by_mode[mode][float(labels["le"])] += value
        elif name.endswith("_count"):
            counts[mode] += value
    rows = []
    for mode, buckets in sorted(by_mode.items()):
        pairs = list(buckets.items())
        p50, p95 = histogram_quantile(0.5, pairs), histogram_quantile(0.95, pairs)
        if counts[mode]:
            rows.append({"mode": mode, "count": int(counts[mode]), "p50_ms": round(p50 * 1000, 1),
                         "p95_ms": round(p95 * 1000, 1)})
    return rows


def session_store_hit_rate() -> list[dict[str, Any]]:
    tiers: dict[str, dict[str, float]] = defaultdict(lambda: {"hit": 0.0, "miss": 0.0})
    for name, labels, value in _samples(SESSION_COUNTERS):
        if not name.endswith("_total"):
            continue
        result = labels.get("outcome") or labels.get("result") or ""
        if result in ("hit", "miss"):
            tiers[labels.get("tier", "all")][result] += value
    rows = []
    for tier, c in sorted(tiers.items()):
        lookups = c["hit"] + c["miss"]
        if lookups:
            rows.append({"tier": tier, "hits": int(c["hit"]), "misses": int(c["miss"]), "rate": c["hit"] / lookups})
    return rows


def _plugins_from_metrics() -> list[dict[str, Any]]:
    plugins: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0.0, "failures": 0.0})
    for name, labels, value in _samples(PLUGIN_COUNTERS):
        if not name.endswith("_total"):
            continue
        plugin = labels.get("plugin", "?")
        plugins[plugin]["calls"] += value
        if labels.get("outcome", "") in FAILED_OUTCOMES:
            plugins[plugin]["failures"] += value
    return [{"plugin": p, "calls": int(c["calls"]), "failures": int(c["failures"]),
             "rate": c["failures"] / c["calls"] if c["calls"] else 0.0} for p, c in sorted(plugins.items()) if c["calls"]]


def _invocation_model():
    """The plugins app's invocation record, found by shape rather than by a name fixed in advance."""
    try:
        config = apps.get_app_config("plugins")
    except LookupError:
        return None
    for model in config.get_models():
        names = {f.name for f in model._meta.concrete_fields}
        if "invocation" in model.__name__.lower() and names & {"outcome", "status"} and names & {"plugin", "plugin_name"}:
            return model
    return None


def _plugins_from_database(model, since: dt.datetime) -> list[dict[str, Any]]:
    names = {f.name for f in model._meta.concrete_fields}
    outcome = "outcome" if "outcome" in names else "status"
    plugin = "plugin_name" if "plugin_name" in names else "plugin"
    if model._meta.get_field(plugin).is_relation:
        plugin = f"{plugin}__name" if "name" in {f.name for f in model._meta.get_field(plugin).related_model._meta.fields} else plugin
    time_field = next((n for n in ("created_at", "started_at", "ts", "timestamp") if n in names), None)
    qs = model._default_manager.all()
    if time_field:
        qs = qs.filter(**{f"{time_field}__gte": since})
    rows: dict[str, dict[str, int]] = defaultdict(lambda: {"calls": 0, "failures": 0})
    for row in qs.values(plugin, outcome).annotate(n=Count("pk")).order_by():
        entry = rows[str(row[plugin])]
        entry["calls"] += row["n"]
        if str(row[outcome]).lower() in FAILED_OUTCOMES:
            entry["failures"] += row["n"]
    return [{"plugin": p, "calls": c["calls"], "failures": c["failures"],
             "rate": c["failures"] / c["calls"] if c["calls"] else 0.0} for p, c in sorted(rows.items())]


# --- database ---------------------------------------------------------------------------------

def _days(since: dt.date, days: int) -> list[dt.date]:
    return [since + dt.timedelta(days=i) for i in range(days)]


def _conversation_figures(board: Dashboard, day_list: list[dt.date]) -> None:
    Message, Feedback = _model("conversations.Message"), _model("conversations.Feedback")
    if Message is None:
        board.missing.append("conversations")
        return
    index = {d: i for i, d in enumerate(day_list)}
    n = len(day_list)
    board.answers, board.unanswered_per_day = [0] * n, [0] * n
    board.prompt_tokens, board.completion_tokens = [0] * n, [0] * n
    assistant = Message.objects.filter(role="assistant", created_at__gte=board.since)
    for row in assistant.annotate(day=TruncDate("created_at")).values("day").annotate(
            n=Count("pk"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens")).order_by():
        if row["day"] in index:
            i = index[row["day"]]
            board.answers[i] = row["n"]
            board.prompt_tokens[i] = row["prompt"] or 0
            board.completion_tokens[i] = row["completion"] or 0

    # Unanswered: the answer cites nothing (no relevant chunk, no plugin result: both become citations).
    unanswered = assistant.filter(citations=[])
    for row in unanswered.annotate(day=TruncDate("created_at")).values("day").annotate(n=Count("pk")).order_by():
        if row["day"] in index:
            board.unanswered_per_day[index[row["day"]]] = row["n"]
    question = Message.objects.filter(conversation=OuterRef("conversation"), role="user",
                                      id__lt=OuterRef("id")).order_by("-id").values("content")[:1]
    groups: dict[str, dict[str, Any]] = {}
    for row in unanswered.annotate(question=Subquery(question)).order_by("-created_at").values(
            "question", "created_at", "conversation__session_id")[:2000]:
        text = " ".join((row["question"] or "").split())
        if not text:
            continue
        key = text.lower()
        entry = groups.setdefault(key, {"question": text[:300], "count": 0, "last_asked": row["created_at"],
                                        "session_id": row["conversation__session_id"]})
        entry["count"] += 1
    board.unanswered = sorted(groups.values(), key=lambda e: (-e["count"], -e["last_asked"].timestamp()))[:30]

    latencies: dict[dt.date, list[float]] = defaultdict(list)
    for created, latency in assistant.exclude(latency_ms=None).order_by("-created_at").values_list(
            "created_at", "latency_ms")[:LATENCY_SAMPLE_LIMIT]:
        latencies[timezone.localtime(created).date()].append(latency)
    board.latency_p50 = [_round(percentile(latencies.get(d, []), 0.5)) for d in day_list]
    board.latency_p95 = [_round(percentile(latencies.get(d, []), 0.95)) for d in day_list]

    costs = []
    for row in assistant.values("generator").annotate(prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"),
                                                      answers=Count("pk")).order_by("generator"):
        price = price_for(row["generator"] or "")
        prompt, completion = row["prompt"] or 0, row["completion"] or 0
        costs.append({"generator": row["generator"] or "(unknown)", "answers": row["answers"], "prompt_tokens": prompt,
                      "completion_tokens": completion, "price_prompt": price["prompt"],
                      "price_completion": price["completion"],
                      "cost": round(prompt / 1000 * price["prompt"] + completion / 1000 * price["completion"], 4)})
    board.cost_by_model = costs

    board.feedback_up, board.feedback_down = [0] * n, [0] * n
    if Feedback is not None:
        for row in Feedback.objects.filter(created_at__gte=board.since).annotate(day=TruncDate("created_at")).values(
                "day").annotate(up=Count("pk", filter=Q(rating="up")), down=Count("pk", filter=Q(rating="down"))
                                ).order_by():
            if row["day"] in index:
                board.feedback_up[index[row["day"]]] = row["up"]
                board.feedback_down[index[row["day"]]] = row["down"]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _cluster_figures(board: Dashboard) -> None:
    KnowledgeBase, IndexVersion = _model("knowledge.KnowledgeBase"), _model("knowledge.IndexVersion")
    active: dict[str, int] = {}
    if KnowledgeBase is not None and IndexVersion is not None:
        failed = dict(IndexVersion.objects.filter(status="failed", created_at__gte=board.since).values(
            "knowledge_base").annotate(n=Count("pk")).values_list("knowledge_base", "n"))
        actives = {iv.knowledge_base_id: iv for iv in IndexVersion.objects.filter(status="active")}
        for kb in KnowledgeBase.objects.order_by("name"):
            current = actives.get(kb.pk)
            active[str(kb.pk)] = current.version if current else 0
            board.knowledge_bases.append({
                "id": kb.pk, "slug": kb.slug, "name": kb.name, "active_version": current.version if current else None,
                "chunks": current.chunk_count if current else 0, "built_at": current.activated_at if current else None,
                "failed_builds": failed.get(kb.pk, 0),
            })
    else:
        board.missing.append("knowledge")
    try:
        from apps.core.registry import instances_list
    except ImportError:
        board.instances = [{"id": settings.INSTANCE_ID, "kind": "web", "indexes": {}, "age_seconds": 0}]
        return
    try:
        rows = instances_list()
    except Exception as exc:  # Redis down: say so on the page instead of failing it
        board.instances_error = gettext("The instance registry could not be read (%(error)s).") % {
            "error": exc.__class__.__name__}
        return
    slugs = {str(kb["id"]): kb["slug"] for kb in board.knowledge_bases}
    for row in rows:
        held = row.get("indexes") if isinstance(row.get("indexes"), dict) else {}
        row["index_list"] = [{"kb": slugs.get(str(k), str(k)), "version": v,
                              "stale": str(k) in active and v is not None and int(v) < active[str(k)]}
                             for k, v in sorted(held.items())]
        row["stale"] = any(entry["stale"] for entry in row["index_list"])
    board.instances = rows


def dashboard_build(*, user, days: int | None = None) -> Dashboard:
    authz.require(user, "dashboard.view")
    days = parse_days(days)
    today = timezone.localdate()
    first_day = today - dt.timedelta(days=days - 1)
    since = timezone.make_aware(dt.datetime.combine(first_day, dt.time.min))
    board = Dashboard(days=days, since=since, currency=getattr(settings, "LLM_PRICE_CURRENCY", "USD"))
    day_list = _days(first_day, days)
    board.day_labels = [d.strftime("%m-%d") for d in day_list]
    _conversation_figures(board, day_list)
    _cluster_figures(board)
    board.retrieval = retrieval_latency()
    board.session_store = session_store_hit_rate()
    model = _invocation_model()
    if model is not None:
        board.plugins, board.plugins_source = _plugins_from_database(model, since), "database"
    else:
        board.plugins, board.plugins_source = _plugins_from_metrics(), "this instance"
    return board
