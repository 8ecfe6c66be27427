"""Plugin metrics, registered on the process-wide monitoring REGISTRY (labels: plugin names and fixed sets)."""
from prometheus_client import Counter, Gauge, Histogram

from apps.monitoring.metrics import LATENCY_BUCKETS, REGISTRY

plugin_invocations_total = Counter(
    "kotaemon_plugin_invocations_total", "Plugin hook invocations by plugin and outcome (ok, error, timeout, denied)",
    ["plugin", "outcome"], registry=REGISTRY,
)
plugin_duration_seconds = Histogram(
    "kotaemon_plugin_duration_seconds", "Plugin hook wall-clock duration, sandbox round trip included",
    ["plugin"], buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
intent_routes_total = Counter(
    "kotaemon_intent_routes_total", "Intent router decisions ('none' when plain RAG answers)", ["intent"],
    registry=REGISTRY,
)
plugin_workers_started_total = Counter(
    "kotaemon_plugin_workers_started_total", "Sandbox worker processes started (replacements included)",
    ["plugin"], registry=REGISTRY,
)
plugin_config_version = Gauge(
    "kotaemon_plugin_config_version", "Plugin config version this instance runs", registry=REGISTRY,
)
plugin_sandbox_violations_total = Counter(
    "kotaemon_plugin_sandbox_violations_total",
    "Forbidden operations plugins attempted (reported by the worker's audit hook or enforced by the kernel)",
    ["plugin", "code"], registry=REGISTRY,
)
