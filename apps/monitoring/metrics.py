"""Prometheus metrics of this process (one process = one instance; scale with replicas).

Labels stay low-cardinality: routes are URL patterns, never raw paths or ids.
"""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the view)
from prometheus_client import ProcessCollector, PlatformCollector

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

http_requests_total = Counter(
    "kotaemon_http_requests_total", "HTTP requests handled", ["method", "route", "status"], registry=REGISTRY
)
http_request_duration_seconds = Histogram(
    "kotaemon_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
websocket_connections_total = Counter(
    "kotaemon_websocket_connections_total", "Websocket connections by route and outcome", ["route", "outcome"],
    registry=REGISTRY,
)
instance_info = Gauge("kotaemon_instance_info", "Constant 1, labelled with the instance id", ["instance_id"],
                      registry=REGISTRY)


def render() -> bytes:
    return generate_latest(REGISTRY)


# --- Websockets (counted by apps.monitoring.websocket.WebsocketMetricsMiddleware) ----------
websocket_connections_active = Gauge(
    "kotaemon_websocket_connections_active", "Websocket connections open now", ["route"], registry=REGISTRY,
)
websocket_messages_total = Counter(
    "kotaemon_websocket_messages_total", "Websocket frames received from clients", ["route"], registry=REGISTRY,
)
websocket_message_duration_seconds = Histogram(
    "kotaemon_websocket_message_duration_seconds",
    "Time from a client frame to the first frame sent back (websocket request latency)", ["route"],
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
websocket_connection_duration_seconds = Histogram(
    "kotaemon_websocket_connection_duration_seconds", "How long websocket connections stay open", ["route"],
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600), registry=REGISTRY,
)

# --- Celery (recorded by apps.monitoring.celery_signals) ------------------------------------
celery_tasks_total = Counter(
    "kotaemon_celery_tasks_total", "Celery tasks finished, by task name and outcome "
    "(success, failure, retry, revoked, rejected)", ["task", "outcome"], registry=REGISTRY,
)
celery_task_duration_seconds = Histogram(
    "kotaemon_celery_task_duration_seconds", "Celery task run time", ["task"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900), registry=REGISTRY,
)
celery_queue_wait_seconds = Histogram(
    "kotaemon_celery_queue_wait_seconds", "Time a task waited in the broker queue before a worker started it",
    ["task"], buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600), registry=REGISTRY,
)

# --- Audit log --------------------------------------------------------------------------
audit_events_total = Counter(
    "kotaemon_audit_events_total", "Audit log rows written, by model and action", ["model", "action"],
    registry=REGISTRY,
)


def exported_metric_names() -> set[str]:
    """Names of every metric family registered in this process, as they appear in /metrics
    (counters without the _total suffix are reported by prometheus_client under their base name)."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
    return names
