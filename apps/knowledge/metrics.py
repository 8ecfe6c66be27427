"""Knowledge metrics on the shared Prometheus registry (labels stay low-cardinality: no ids)."""
from prometheus_client import Counter, Gauge, Histogram

from apps.monitoring.metrics import LATENCY_BUCKETS, REGISTRY

documents_ingested_total = Counter(
    "kotaemon_knowledge_documents_ingested_total", "Documents through ingestion, by outcome", ["outcome"],
    registry=REGISTRY,
)
embeddings_total = Counter(
    "kotaemon_knowledge_embeddings_total", "Chunk embeddings needed, by source (encoded or reused from storage)",
    ["source"], registry=REGISTRY,
)
index_builds_total = Counter(
    "kotaemon_knowledge_index_builds_total", "Index version builds, by outcome", ["outcome"], registry=REGISTRY,
)
index_build_seconds = Histogram(
    "kotaemon_knowledge_index_build_seconds", "Time to build and activate an index version",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=REGISTRY,
)
index_loads_total = Counter(
    "kotaemon_knowledge_index_loads_total", "Index versions loaded into this process, by trigger", ["trigger"],
    registry=REGISTRY,
)
retrieval_seconds = Histogram(
    "kotaemon_knowledge_retrieval_seconds", "chunks_retrieve latency by mode and cache result", ["mode", "cache"],
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
index_load_failures_total = Counter(
    "kotaemon_knowledge_index_load_failures_total", "Index versions this process could not load", registry=REGISTRY,
)
indexes_degraded = Gauge(
    "kotaemon_knowledge_indexes_degraded", "Knowledge bases whose active index version this process cannot load",
    registry=REGISTRY,
)
index_memory_bytes = Gauge(
    "kotaemon_knowledge_index_memory_bytes", "Resident bytes of the index segments this process holds",
    registry=REGISTRY,
)
index_build_chunks_total = Counter(
    "kotaemon_knowledge_index_build_chunks_total", "Chunks written into new index segments, by build kind",
    ["kind"], registry=REGISTRY,
)
documents_swept_total = Counter(
    "kotaemon_knowledge_documents_swept_total", "Stuck documents the sweeper found, by action (requeued, parked)",
    ["action"], registry=REGISTRY,
)
