"""The plugin registry as the cluster runtime sees it (apps.core.cluster looks these names up).

- config_version(): the plugin config version this process runs (heartbeat field).
- reconcile(): cheap periodic check against the database; heals a missed plugin_config_updated.
- warm_up(): start workers for enabled plugins and embed the router's examples before traffic.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def config_version() -> int | None:
    from .services import _state

    with _state.lock:
        return _state.snapshot.version if _state.snapshot is not None else None


def reconcile() -> None:
    from .services import plugins_snapshot

    plugins_snapshot()


def warm_up() -> None:
    from .services import plugins_snapshot

    snap = plugins_snapshot()
    if any(p.intents() for p in snap.active()):
        try:
            snap.router().scores("warm up")
        except Exception:  # noqa: BLE001 - routing embeds lazily on the first turn instead
            logger.warning("plugin router warm-up failed", exc_info=True)
