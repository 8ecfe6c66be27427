"""A real HTTP order service for tests (http.server in a thread on 127.0.0.1, a free port)."""
from __future__ import annotations

import json
import re
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ORDERS = {
    "A1001": {"id": "A1001", "status": "in transit", "placed_at": "2026-11-02", "expected_delivery": "2026-11-20",
              "carrier": "DHL", "delay_reason": "carrier backlog after a storm", "tracking_url": "https://track.example.com/A1001",
              "items": [{"name": "Desk lamp"}]},
    "A0999": {"id": "A0999", "status": "delivered", "placed_at": "2026-10-01", "items": [{"name": "Cable"}]},
}
REFUNDS = [{"order_id": "A0999", "status": "completed", "amount": 12.5, "currency": "EUR",
            "requested_at": "2026-10-10", "completed_at": "2026-10-14"}]


class OrderService:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.fail = False

    def handle(self, handler: BaseHTTPRequestHandler) -> tuple[int, object]:
        self.requests.append({"path": handler.path, "method": handler.command, "headers": dict(handler.headers)})
        if self.fail:
            return 503, {"error": "maintenance"}
        path = handler.path.split("?")[0]
        if m := re.fullmatch(r"/users/([^/]+)/orders", path):
            return 200, {"orders": [ORDERS["A1001"], ORDERS["A0999"]]}
        if m := re.fullmatch(r"/users/([^/]+)/orders/([^/]+)", path):
            order = ORDERS.get(m.group(2))
            return (200, order) if order else (404, {"error": "not found"})
        if re.fullmatch(r"/users/([^/]+)/refunds", path):
            return 200, {"refunds": REFUNDS}
        if m := re.fullmatch(r"/employees/([^/]+)/leave", path):
            return 200, {"annual_remaining": 12, "sick_remaining": 4, "employee": m.group(1)}
        if m := re.fullmatch(r"/api/status/([^/]+)", path):
            return 200, {"data": {"status": "approved", "user": m.group(1)}, "items": [{"name": "first"}]}
        return 404, {"error": "no route"}


@contextmanager
def order_service():
    service = OrderService()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            status, body = service.handle(self)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        service.url = f"http://127.0.0.1:{server.server_address[1]}"
        service.host = f"127.0.0.1:{server.server_address[1]}"  # for a plugin's explicit allowed_hosts
        yield service
    finally:
        server.shutdown()
        server.server_close()
