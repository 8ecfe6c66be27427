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
