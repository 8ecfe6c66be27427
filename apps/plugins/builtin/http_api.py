"""http_api: calls any HTTP API, configured entirely in the admin.

Templates use {user.id}, {user.username}, {user.email}, {slot.NAME} (named groups of the keyword
patterns), {message} and, in headers only, {secret} (the write-only secret field). Values put in
the URL are percent-encoded. The host of url_template is the only host the plugin may call (plus
the admin's extra allowed hosts); it cannot contain placeholders.
"""
from __future__ import annotations

import json
import re
import string
import urllib.parse
from typing import Any

from apps.plugins.base import SCOPE_HTTP, BasePlugin, HookContext, PluginError, Result, intent_hook

_MISSING = object()


def dig(data: Any, path: str) -> Any:
    """'data.items.0.status' -> data["data"]["items"][0]["status"]; _MISSING when absent."""
    current = data
    for part in [p for p in path.split(".") if p]:
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and re.fullmatch(r"-?\d+", part) and -len(current) <= int(part) < len(current):
            current = current[int(part)]
        else:
            return _MISSING
    return current


class _Values(dict):
    def __missing__(self, key: str) -> str:
        raise PluginError("template_error", f"unknown placeholder {{{key}}}")


def render(template: str, ctx: HookContext, *, quote: bool, secret: str | None = None) -> str:
    def enc(value: Any) -> str:
        text = "" if value is None else str(value)
        return urllib.parse.quote(text, safe="") if quote else text

    values = _Values({
        "user.id": enc(ctx.user.id), "user.username": enc(ctx.user.username), "user.email": enc(ctx.user.email),
        "message": enc(ctx.message), "intent": enc(ctx.intent),
    })
    values.update({f"slot.{k}": enc(v) for k, v in ctx.slots.items()})
    if secret is not None:
        values["secret"] = secret
    out = []
    for literal, field, spec, conv in string.Formatter().parse(template):
        out.append(literal)
        if field is not None:
            if field.startswith("slot.") and field not in values:
                raise PluginError("missing_slot", f"the message did not contain {field[5:]!r}")
            out.append(values[field])
    return "".join(out)


class HttpApiPlugin(BasePlugin):
    name = "http_api"
    description = "Calls a configurable HTTP API for one intent and reports one field of its JSON response."
    version = "1.0.0"
    scopes = (SCOPE_HTTP,)
    config_schema = {
        "type": "object",
        "properties": {
            "intent": {"type": "string", "pattern": "^[a-z][a-z0-9_]{1,63}$", "default": "http_api_lookup",
                       "description": "Intent name this API answers."},
            "examples": {"type": "array", "items": {"type": "string", "minLength": 3}, "minItems": 1,
                         "default": ["check the status in the external system"],
                         "description": "Example utterances (8+ varied phrasings work best)."},
            "keywords": {"type": "array", "items": {"type": "string"}, "default": [],
                         "description": "Regexes; named groups become {slot.NAME}."},
            "priority": {"type": "integer", "default": 0},
            "url_template": {"type": "string", "pattern": "^https?://[^/{}]+(/.*)?$", "x-allow-host": True,
                             "description": "e.g. https://api.example.com/v1/users/{user.id}/status"},
            "method": {"type": "string", "enum": ["GET", "POST"], "default": "GET"},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}, "default": {},
                        "description": "Header templates; use {secret} for the secret, e.g. 'Bearer {secret}'."},
            "body_template": {"type": "string", "default": "",
                              "description": "JSON body for POST; placeholders are JSON-escaped."},
            "secret": {"type": "string", "secret": True, "description": "API token, write-only."},
            "response_field": {"type": "string", "minLength": 1,
                               "description": "Dotted path of the field to report, e.g. data.status or items.0.name"},
            "title": {"type": "string", "default": "External system"},
            "answer_template": {"type": "string", "default": "{value}",
                                "description": "How to phrase the value; {value} is replaced."},
            "request_timeout_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 30, "default": 3},
        },
        "required": ["url_template", "response_field"],
        "additionalProperties": False,
    }

    @intent_hook(configurable=True)
    def call_api(self, ctx: HookContext) -> Result:
        cfg = ctx.config
        url = render(cfg["url_template"], ctx, quote=True)
        headers = {name: render(value, ctx, quote=False, secret=cfg.get("secret") or "")
                   for name, value in (cfg.get("headers") or {}).items()}
        body = None
        if cfg["method"] == "POST" and cfg.get("body_template"):
            body = self._json_body(cfg["body_template"], ctx)
            headers.setdefault("Content-Type", "application/json")
        resp = ctx.http.request(cfg["method"], url, data=body, headers=headers,
                                timeout=cfg["request_timeout_seconds"])
        resp.raise_for_status()
        value = dig(resp.json(), cfg["response_field"])
        if value is _MISSING:
            raise PluginError("field_missing", f"the response has no field {cfg['response_field']!r}")
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        content = cfg["answer_template"].replace("{value}", shown)
        return Result(title=cfg["title"], content=content, data={"value": value, "field": cfg["response_field"]})

    @staticmethod
    def _json_body(template: str, ctx: HookContext) -> str:
        # Placeholders are rendered as JSON string contents, so user text cannot break the JSON.
        escaped = _JsonEscapingContext(ctx)
        rendered = render(template, escaped, quote=False)
        try:
            json.loads(rendered)
        except ValueError as exc:
            raise PluginError("template_error", f"body_template does not render to JSON: {exc}") from None
        return rendered


class _JsonEscapingContext:
    def __init__(self, ctx: HookContext) -> None:
        def esc(value: Any) -> str:
            return json.dumps("" if value is None else str(value))[1:-1]

        self.user = type("U", (), {"id": esc(ctx.user.id), "username": esc(ctx.user.username),
                                   "email": esc(ctx.user.email)})()
        self.message = esc(ctx.message)
        self.intent = esc(ctx.intent)
        self.slots = {k: esc(v) for k, v in ctx.slots.items()}
