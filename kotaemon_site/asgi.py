"""ASGI entry point: one application for HTTP and websockets.

Run with uvicorn: uvicorn kotaemon_site.asgi:application --host 0.0.0.0 --port 8000
"""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kotaemon_site.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from apps.core.ws_auth import ApiKeyOrSessionAuthMiddlewareStack, CookieOriginValidator  # noqa: E402
from kotaemon_site.routing import websocket_urlpatterns  # noqa: E402
from apps.core.runtime import configure_process  # noqa: E402
from apps.core.cluster import ClusterLifespan  # noqa: E402
from apps.monitoring.websocket import WebsocketMetricsMiddleware  # noqa: E402

configure_process(kind="web")

# ClusterLifespan: on the ASGI lifespan startup each server process subscribes to cluster events, starts
# its heartbeat and loads its indexes before /readyz says ready (apps/core/cluster.py, docs/cluster.md).
application = ClusterLifespan(ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": WebsocketMetricsMiddleware(
            # The Origin check guards cookie sessions; bearer-key clients may omit Origin (apps/core/ws_auth.py).
            CookieOriginValidator(ApiKeyOrSessionAuthMiddlewareStack(URLRouter(websocket_urlpatterns)))
        ),
    }
))
