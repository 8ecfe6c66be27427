"""Writes kotaemon.json, the Grafana dashboard of the platform's Prometheus metrics.

Edit the panels here, run `python deploy/grafana/build_dashboard.py`, commit both files
(tests/monitoring/test_grafana_and_alerts.py checks that they agree and that every query names a
metric the platform exports). Import kotaemon.json in Grafana (Dashboards > Import); it asks for the
Prometheus data source.
"""
from __future__ import annotations

import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
INSTANCE = 'instance=~"$instance"'


def rate(metric: str, by: str, window: str = "5m", match: str = "") -> str:
    selector = ", ".join(x for x in (INSTANCE, match) if x)
    return f"sum by ({by}) (rate({metric}{{{selector}}}[{window}]))"


def quantile(q: float, metric: str, by: str = "", window: str = "5m") -> str:
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{INSTANCE}}}[{window}])))"


def panel(title: str, targets: list[tuple[str, str]], *, unit: str = "short", kind: str = "timeseries",
          description: str = "", w: int = 12, h: int = 8, max_value: float | None = None) -> dict:
    defaults: dict = {"unit": unit}
    if max_value is not None:
        defaults["max"] = max_value
        defaults["min"] = 0
    return {
        "type": kind, "title": title, "description": description, "datasource": DS,
        "gridPos": {"w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {},
        "targets": [{"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(65 + i)}
                    for i, (expr, legend) in enumerate(targets)],
    }


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"w": 24, "h": 1}, "panels": []}


PANELS = [
    row("Traffic"),
    panel("HTTP requests by status", [(rate("kotaemon_http_requests_total", "status"), "{{status}}")], unit="reqps"),
    panel("HTTP latency p95 by route", [(quantile(0.95, "kotaemon_http_request_duration_seconds", "route"),
                                         "{{route}}")], unit="s"),
    panel("Websocket connections open", [(f"sum by (route) (kotaemon_websocket_connections_active{{{INSTANCE}}})",
                                          "{{route}}")], w=8),
    panel("Websocket connects by outcome", [(rate("kotaemon_websocket_connections_total", "outcome"),
                                             "{{outcome}}")], unit="ops", w=8),
    panel("Websocket reply latency p95", [(quantile(0.95, "kotaemon_websocket_message_duration_seconds", "route"),
                                           "{{route}}")], unit="s", w=8),
    row("Answers"),
    panel("Chat turns by outcome", [(rate("kotaemon_chat_turns_total", "channel, outcome"),
                                     "{{channel}} {{outcome}}")], unit="ops"),
    panel("Chat turn latency p50 / p95", [
        (quantile(0.5, "kotaemon_chat_turn_duration_seconds"), "p50"),
        (quantile(0.95, "kotaemon_chat_turn_duration_seconds"), "p95")], unit="s"),
    panel("Retrieval latency p50 / p95 by mode", [
        (quantile(0.5, "kotaemon_knowledge_retrieval_seconds", "mode"), "p50 {{mode}}"),
        (quantile(0.95, "kotaemon_knowledge_retrieval_seconds", "mode"), "p95 {{mode}}")], unit="s"),
    panel("Retrieval empty-result rate", [(
        f'sum(rate(kotaemon_chat_retrievals_total{{{INSTANCE}, result="empty"}}[15m])) / '
        f'clamp_min(sum(rate(kotaemon_chat_retrievals_total{{{INSTANCE}, result=~"found|empty"}}[15m])), 1e-9)',
        "empty")], unit="percentunit", max_value=1,
        description="Chat turns whose retrieval found nothing relevant: gaps in the knowledge bases."),
    row("LLM"),
    panel("LLM calls by outcome", [(rate("kotaemon_llm_calls_total", "generator, outcome"),
                                    "{{generator}} {{outcome}}")], unit="ops", w=8),
    panel("LLM latency p50 / p95", [
        (quantile(0.5, "kotaemon_llm_latency_seconds", "generator"), "p50 {{generator}}"),
        (quantile(0.95, "kotaemon_llm_latency_seconds", "generator"), "p95 {{generator}}")], unit="s", w=8),
    panel("LLM tokens per second", [(rate("kotaemon_llm_tokens_total", "generator, kind"),
                                     "{{generator}} {{kind}}")], w=8),
    row("Plugins"),
    panel("Plugin invocations by outcome", [(rate("kotaemon_plugin_invocations_total", "plugin, outcome"),
                                             "{{plugin}} {{outcome}}")], unit="ops", w=8),
    panel("Plugin failure rate", [(
        f'sum by (plugin) (rate(kotaemon_plugin_invocations_total{{{INSTANCE}, outcome=~"error|timeout"}}[10m])) / '
        f"clamp_min(sum by (plugin) (rate(kotaemon_plugin_invocations_total{{{INSTANCE}}}[10m])), 1e-9)",
        "{{plugin}}")], unit="percentunit", max_value=1, w=8),
    panel("Plugin duration p95", [(quantile(0.95, "kotaemon_plugin_duration_seconds", "plugin"), "{{plugin}}")],
          unit="s", w=8),
    row("Knowledge and indexing"),
    panel("Active index version by knowledge base", [("max by (kb) (kotaemon_index_active_version)", "{{kb}}")],
          kind="stat", w=6),
    panel("Index size (chunks)", [("max by (kb) (kotaemon_index_size_chunks)", "{{kb}}")], kind="stat", w=6),
    panel("Index versions loaded per instance", [(f"kotaemon_index_loaded_version{{{INSTANCE}}}",
                                                  "{{instance}} {{kb}}")], w=12,
          description="Below the active version: that instance still serves an older index."),
    panel("Index builds by outcome", [(
        f"sum by (outcome) (increase(kotaemon_knowledge_index_builds_total{{{INSTANCE}}}[1h]))", "{{outcome}}")], w=8),
    panel("Index build duration p95", [(quantile(0.95, "kotaemon_knowledge_index_build_seconds", window="1h"),
                                        "p95")], unit="s", w=8),
    panel("Documents ingested by outcome", [(
        f"sum by (outcome) (increase(kotaemon_knowledge_documents_ingested_total{{{INSTANCE}}}[1h]))",
        "{{outcome}}")], w=8),
    row("Background tasks"),
    panel("Celery tasks by outcome", [(rate("kotaemon_celery_tasks_total", "task, outcome"),
                                       "{{task}} {{outcome}}")], unit="ops"),
    panel("Celery queue wait p95", [(quantile(0.95, "kotaemon_celery_queue_wait_seconds", "task"), "{{task}}")],
          unit="s"),
    row("Sessions and cluster"),
    panel("Session store hit rate by tier", [(
        f'sum by (tier) (rate(kotaemon_session_store_lookups_total{{{INSTANCE}, outcome="hit"}}[5m])) / '
        f"clamp_min(sum by (tier) (rate(kotaemon_session_store_lookups_total{{{INSTANCE}}}[5m])), 1e-9)",
        "{{tier}}")], unit="percentunit", max_value=1, w=8),
    panel("Cluster event propagation lag p95", [(quantile(0.95, "kotaemon_cluster_event_lag_seconds", "type"),
                                                 "{{type}}")], unit="s", w=8),
    panel("Seconds since each instance's heartbeat", [(
        f"time() - kotaemon_instance_heartbeat_timestamp{{{INSTANCE}}}", "{{instance}}")], unit="s", w=8),
    panel("Resident memory by instance", [(f"process_resident_memory_bytes{{{INSTANCE}}}", "{{instance}}")],
          unit="bytes", w=12),
    panel("Audit events by model", [(
        f"sum by (model, action) (increase(kotaemon_audit_events_total{{{INSTANCE}}}[1h]))",
        "{{model}} {{action}}")], w=12),
]


def layout(panels: list[dict]) -> list[dict]:
    """Flow panels left to right, wrapping at Grafana's 24 columns."""
    x = y = row_h = 0
    for i, p in enumerate(panels, 1):
        p["id"] = i
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if p["type"] == "row" or x + w > 24:
            x, y = 0, y + row_h
            row_h = 0
        p["gridPos"].update(x=x, y=y)
        x += w
        row_h = max(row_h, h)
        if p["type"] == "row":
            x, y, row_h = 0, y + h, 0
    return panels


def dashboard() -> dict:
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "pluginId": "prometheus",
                      "pluginName": "Prometheus"}],
        "__requires": [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
                       {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"}],
        "uid": "kotaemon-site",
        "title": "kotaemon-site",
        "description": "Traffic, answers, retrieval, LLM, plugins, indexing, tasks, sessions and cluster health.",
        "tags": ["kotaemon", "rag"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{
            "name": "instance", "label": "Instance", "type": "query", "datasource": DS,
            "query": {"query": "label_values(kotaemon_instance_info, instance)", "refId": "instance"},
            "definition": "label_values(kotaemon_instance_info, instance)",
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
            "current": {"selected": True, "text": "All", "value": "$__all"},
        }]},
        "panels": layout([json.loads(json.dumps(p)) for p in PANELS]),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    target = Path(__file__).with_name("kotaemon.json")
    target.write_text(render())
    print(f"wrote {target}")
