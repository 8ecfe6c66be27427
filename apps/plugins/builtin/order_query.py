"""order_query: answers "where is my order?" and "did my refund go through?" from the order service.

Order service contract (configurable paths; {user} is the user's id, username or email):
  GET {base_url}/users/{user}/orders               -> {"orders": [order, ...]}  newest first
  GET {base_url}/users/{user}/orders/{order_id}    -> order, or 404
  GET {base_url}/users/{user}/refunds              -> {"refunds": [refund, ...]} newest first
  order:  {"id", "status", "placed_at", "expected_delivery", "carrier", "tracking_url", "delay_reason", "items"}
  refund: {"order_id", "status", "amount", "currency", "requested_at", "completed_at"}
The service is asked only about the signed-in user: the user id comes from the platform's verified
identity, never from the message.
"""
from __future__ import annotations

import urllib.parse

from apps.plugins.base import SCOPE_HTTP, BasePlugin, HookContext, PluginError, Result, intent_hook

ORDER_ID = r"(?:order|parcel|package|shipment|purchase)\s*(?:no\.?|number|#)?\s*#?\s*(?P<order_id>[A-Za-z]{0,3}-?\d{3,})"
HASH_ID = r"#\s*(?P<order_id>[A-Za-z]{0,3}-?\d{3,})"
REFUND_ID = r"\b(?:refund|reimburse|money back)\w*\b.*?(?:order\s*)?#?\s*(?P<order_id>[A-Za-z]{0,3}-?\d{3,})"


def _order_line(order: dict) -> str:
    parts = [f"Order {order.get('id')}: status {order.get('status', 'unknown')}"]
    if order.get("delay_reason"):
        parts.append(f"delayed ({order['delay_reason']})")
    if order.get("placed_at"):
        parts.append(f"placed {order['placed_at']}")
    if order.get("expected_delivery"):
        parts.append(f"expected delivery {order['expected_delivery']}")
    if order.get("carrier"):
        parts.append(f"carrier {order['carrier']}")
    items = order.get("items") or []
    if items:
        names = [i.get("name", str(i)) if isinstance(i, dict) else str(i) for i in items[:3]]
        parts.append("items: " + ", ".join(names))
    return "; ".join(parts) + "."


def _refund_line(refund: dict) -> str:
    amount = f"{refund.get('amount')} {refund.get('currency', '')}".strip() if refund.get("amount") is not None else ""
    parts = [f"Refund for order {refund.get('order_id')}: status {refund.get('status', 'unknown')}"]
    if amount:
        parts.append(f"amount {amount}")
    if refund.get("requested_at"):
        parts.append(f"requested {refund['requested_at']}")
    if refund.get("completed_at"):
        parts.append(f"completed {refund['completed_at']}")
    return "; ".join(parts) + "."


class OrderQueryPlugin(BasePlugin):
    name = "order_query"
    description = "Looks up the signed-in user's orders and refunds in the order service."
    version = "1.0.0"
    scopes = (SCOPE_HTTP,)
    config_schema = {
        "type": "object",
        "properties": {
            "base_url": {"type": "string", "minLength": 1, "pattern": "^https?://", "x-allow-host": True,
                         "description": "Order service root, e.g. https://orders.internal.example.com/api"},
            "orders_path": {"type": "string", "default": "/users/{user}/orders"},
            "order_path": {"type": "string", "default": "/users/{user}/orders/{order_id}"},
            "refunds_path": {"type": "string", "default": "/users/{user}/refunds"},
            "user_key": {"type": "string", "enum": ["id", "username", "email"], "default": "id",
                         "description": "Which verified identity field the order service knows users by."},
            "max_orders": {"type": "integer", "minimum": 1, "maximum": 10, "default": 3},
            "request_timeout_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 30, "default": 3},
            "api_token": {"type": "string", "secret": True, "description": "Sent as 'Authorization: Bearer ...'."},
        },
        "required": ["base_url"],
        "additionalProperties": False,
    }

    def _get(self, ctx: HookContext, path: str, **values: str):
        cfg = ctx.config
        user_value = str(getattr(ctx.user, cfg["user_key"]))
        quoted = {k: urllib.parse.quote(str(v), safe="") for k, v in values.items()}
        url = cfg["base_url"].rstrip("/") + path.format(user=urllib.parse.quote(user_value, safe=""), **quoted)
        headers = {"Accept": "application/json"}
        if cfg.get("api_token"):
            headers["Authorization"] = f"Bearer {cfg['api_token']}"
        return ctx.http.get(url, headers=headers, timeout=cfg["request_timeout_seconds"])

    @intent_hook(intent="query_order", priority=10, keywords=[ORDER_ID, HASH_ID], examples=[
        "where is my order",
        "track my package",
        "has my order shipped yet",
        "when will my delivery arrive",
        "what's the status of my order",
        "my parcel hasn't shown up",
        "check the status of order 12345",
        "is my purchase on its way",
        "I still haven't received what I bought",
        "why is my order late",
        "where's my package at",
        "did my order get dispatched",
    ])
    def query_order(self, ctx: HookContext) -> Result:
        order_id = ctx.slots.get("order_id")
        if order_id:
            resp = self._get(ctx, ctx.config["order_path"], order_id=order_id)
            if resp.status == 404:
                return Result(title=f"Order {order_id}", data={"order_id": order_id, "found": False},
                              content=f"No order {order_id} was found on your account.")
            resp.raise_for_status()
            order = resp.json()
            return Result(title=f"Order {order.get('id', order_id)} (order service)", content=_order_line(order),
                          data={"orders": [order]}, url=order.get("tracking_url"))
        resp = self._get(ctx, ctx.config["orders_path"])
        resp.raise_for_status()
        body = resp.json()
        orders = (body.get("orders") if isinstance(body, dict) else body) or []
        if not isinstance(orders, list):
            raise PluginError("bad_response", "the order service returned no 'orders' list")
        if not orders:
            return Result(title="Your orders (order service)", content="You have no orders on record.",
                          data={"orders": []})
        shown = orders[: ctx.config["max_orders"]]
        lines = " ".join(_order_line(o) for o in shown)
        return Result(title="Your recent orders (order service)", content=lines, data={"orders": shown},
                      url=shown[0].get("tracking_url"))

    @intent_hook(intent="refund_status", priority=10, keywords=[REFUND_ID], examples=[
        "what's the status of my refund",
        "has my refund been processed",
        "when will I get my money back",
        "did you refund me yet",
        "I returned an item, where is my refund",
        "I haven't received my refund",
        "has the return been credited to my card",
        "check my refund for order 12345",
        "is my refund approved",
        "I cancelled my order, when do I get reimbursed",
    ])
    def refund_status(self, ctx: HookContext) -> Result:
        resp = self._get(ctx, ctx.config["refunds_path"])
        resp.raise_for_status()
        body = resp.json()
        refunds = (body.get("refunds") if isinstance(body, dict) else body) or []
        order_id = ctx.slots.get("order_id")
        if order_id:
            refunds = [r for r in refunds if str(r.get("order_id")) == order_id]
        if not refunds:
            what = f"for order {order_id}" if order_id else "on your account"
            return Result(title="Your refunds (order service)", content=f"There is no refund {what}.",
                          data={"refunds": []})
        shown = refunds[: ctx.config["max_orders"]]
        return Result(title="Your refunds (order service)", content=" ".join(_refund_line(r) for r in shown),
                      data={"refunds": shown})
