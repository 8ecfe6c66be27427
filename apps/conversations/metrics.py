"""Conversation metrics, registered on the process-wide monitoring REGISTRY (low-cardinality labels only)."""
from prometheus_client import Counter, Histogram

from apps.monitoring.metrics import LATENCY_BUCKETS, REGISTRY

session_store_lookups_total = Counter(
    "kotaemon_session_store_lookups_total",
    "Session state lookups by tier (local, redis, memory, database) and outcome (hit, miss)",
    ["tier", "outcome"], registry=REGISTRY,
)
session_store_conflicts_total = Counter(
    "kotaemon_session_store_conflicts_total", "Optimistic-concurrency retries of session state updates",
    registry=REGISTRY,
)
session_store_trimmed_turns_total = Counter(
    "kotaemon_session_store_trimmed_turns_total", "Oldest turns dropped to fit SESSION_STATE_MAX_BYTES",
    registry=REGISTRY,
)
chat_turns_total = Counter(
    "kotaemon_chat_turns_total", "Chat turns by channel and outcome", ["channel", "outcome"], registry=REGISTRY,
)
chat_turn_duration_seconds = Histogram(
    "kotaemon_chat_turn_duration_seconds", "Chat turn latency (retrieval + generation + persistence)",
    ["generator"], buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
llm_calls_total = Counter(
    "kotaemon_llm_calls_total", "Generator calls by generator and outcome (ok, timeout, error)",
    ["generator", "outcome"], registry=REGISTRY,
)
llm_latency_seconds = Histogram(
    "kotaemon_llm_latency_seconds", "Generator latency", ["generator"], buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
llm_tokens_total = Counter(
    "kotaemon_llm_tokens_total", "Tokens used by generator and kind (prompt, completion)", ["generator", "kind"],
    registry=REGISTRY,
)
turn_takeovers_total = Counter(
    "kotaemon_chat_turn_takeovers_total", "Chat turns this instance took over after their generator's lease expired",
    registry=REGISTRY,
)
