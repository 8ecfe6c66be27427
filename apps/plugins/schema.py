"""Plugin config schemas: defaults, validation with readable errors, secret fields, allowed hosts.

A plugin's `config_schema` is JSON Schema (2020-12) of type object. Extra keywords on properties:
  "secret": true        stored encrypted, write-only, never echoed in errors, admin or logs
  "x-allow-host": true  a URL whose host the plugin's HTTP client may call
"""
from __future__ import annotations

import copy
import re
import urllib.parse
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError


def properties(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    props = schema.get("properties") or {}
    return props if isinstance(props, dict) else {}


def secret_fields(schema: dict[str, Any]) -> list[str]:
    return sorted(k for k, v in properties(schema).items() if isinstance(v, dict) and v.get("secret"))


def defaults(schema: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, prop in properties(schema).items():
        if isinstance(prop, dict) and "default" in prop and not prop.get("secret"):
            out[key] = copy.deepcopy(prop["default"])
    return out


def effective_config(schema: dict[str, Any], config: dict[str, Any], secrets: dict[str, Any]) -> dict[str, Any]:
    """Schema defaults, overridden by the stored config, plus the secrets (what the plugin receives)."""
    merged = defaults(schema)
    merged.update({k: copy.deepcopy(v) for k, v in (config or {}).items()})
    merged.update({k: v for k, v in (secrets or {}).items() if v not in (None, "")})
    return merged


def _field_of(error) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "required":
        m = re.match(r"'([^']+)' is a required property", error.message)
        if m:
            return f"{path}.{m.group(1)}" if path else m.group(1)
    if error.validator == "additionalProperties":
        m = re.findall(r"'([^']+)'", error.message)
        if m:
            return f"{path}.{m[0]}" if path else m[0]
    return path or "(config)"


def _message_of(error, secret: bool) -> str:
    if error.validator == "required":
        return "is required"
    if error.validator == "additionalProperties":
        return "is not a setting of this plugin"
    if secret:
        # Never echo a secret back, not even in an error message.
        return f"is invalid (fails '{error.validator}')"
    return error.message


def validate(schema: dict[str, Any], config: Any, secrets: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """Problems with `config` (+ secrets) against `schema`, as [{"field", "message"}], sorted; [] when valid."""
    if not isinstance(config, dict):
        return [{"field": "(config)", "message": "must be a JSON object"}]
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return [{"field": "(schema)", "message": f"the plugin's config_schema is invalid: {exc.message}"}]
    secret_names = set(secret_fields(schema))
    for key in config:
        if key in secret_names:
            return [{"field": key, "message": "is a secret; set it in the secret fields, not in the config"}]
    merged = effective_config(schema, config, secrets or {})
    problems = []
    for error in Draft202012Validator(schema).iter_errors(merged):
        field = _field_of(error)
        top = field.split(".")[0]
        problems.append({"field": field, "message": _message_of(error, top in secret_names)})
    problems += [{"field": f, "message": m} for f, m in _host_problems(schema, merged)]
    unique = {(p["field"], p["message"]): p for p in problems}
    return sorted(unique.values(), key=lambda p: (p["field"], p["message"]))


def _host_problems(schema: dict[str, Any], merged: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for key, prop in properties(schema).items():
        value = merged.get(key)
        if isinstance(prop, dict) and prop.get("x-allow-host") and isinstance(value, str) and value:
            netloc = urllib.parse.urlsplit(value).netloc
            if "{" in netloc or "}" in netloc:
                out.append((key, "the host part of this URL cannot contain placeholders"))
    return out


def hosts_from_config(schema: dict[str, Any], merged: dict[str, Any]) -> list[str]:
    """host[:port] of every URL setting marked x-allow-host."""
    hosts = []
    for key, prop in properties(schema).items():
        value = merged.get(key)
        if not (isinstance(prop, dict) and prop.get("x-allow-host") and isinstance(value, str) and value):
            continue
        parts = urllib.parse.urlsplit(value)
        if parts.hostname and "{" not in parts.netloc:
            try:
                port = parts.port
            except ValueError:
                continue
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            hosts.append(f"{host}:{port}" if port else host)
    return hosts


def format_problems(problems: list[dict[str, str]]) -> str:
    return "; ".join(f"{p['field']}: {p['message']}" for p in problems)
