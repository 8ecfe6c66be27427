"""Structured JSON logs carrying request, session and instance ids on every line.

Every line is one JSON object with at least ts, level, logger, message, request_id, session_id and
instance_id ("-" when not known). The ids come from context variables set per request (HTTP
middleware), per websocket turn (`log_context`) and per Celery task (apps.monitoring.celery_signals),
so code never passes them around. Nothing that looks like a credential or a masked field reaches the
output: messages, extra fields and tracebacks are redacted here, as a last line of defence.
"""
from __future__ import annotations

import contextvars
import json
import logging
import re
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Iterator

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
session_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("session_id", default="-")
# The HttpRequest being served (for the audit log's actor, resolved lazily: DRF authenticates late).
current_request_var: contextvars.ContextVar[Any] = contextvars.ContextVar("current_request", default=None)
# An explicit actor label for work outside a request ("command:archive_conversations", "task:...").
actor_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("actor", default=None)

_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {
    "message", "asctime", "request_id", "session_id", "instance_id", "taskName",
}
MASK = "***"

# Field names whose values are never written anywhere (logs, audit log). Matched as substrings.
SECRET_FIELD_RE = re.compile(
    r"secret|password|passwd|key_hash|token|api_?key|authorization|credential|cookie|private_key|sessionid",
    re.I,
)

# Values that look like credentials, whatever the field they are in.
_BUILTIN_VALUE_PATTERNS = [
    # Our own API keys: keep the public prefix (it identifies the key to humans), drop the secret.
    (re.compile(r"\b(ks_[0-9a-f]{8})_[A-Za-z0-9_\-]+"), r"\1_" + MASK),
    # key=value and key: value pairs (query strings, form bodies, headers written into messages).
    (re.compile(
        r"(?i)\b((?:password|passwd|secret|api[_-]?key|access[_-]?token|refresh[_-]?token|token|client_secret|"
        r"authorization|sessionid|csrftoken)[\"']?\s*[=:]\s*[\"']?)(?:bearer\s+|basic\s+)?[^\s&\"',;}]+"),
     r"\1" + MASK),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{8,}"), r"\1 " + MASK),
    # Provider keys (OpenAI-style, AWS access key ids) and JWTs.
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"), MASK),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), MASK),
    (re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"), MASK),
]
# Payment card numbers (13-19 digits, optional separators), masked only when the Luhn check passes
# so order numbers and timestamps survive.
_CARD_RE = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")


def _luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _mask_card(match: re.Match) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return MASK if _luhn_ok(digits) else match.group(0)


@lru_cache(maxsize=1)
def _configured_patterns() -> tuple[tuple[re.Pattern, ...], tuple[str, ...]]:
    """Operator-configured masking regexes and the literal values of configured secrets.

    Cached for the process: settings do not change at run time (tests that override them call
    `_configured_patterns.cache_clear()`).
    """
    try:
        from django.conf import settings

        extra = tuple(re.compile(p) for p in getattr(settings, "SENSITIVE_PATTERNS", []) or [])
        literals = tuple(
            str(v) for v in (getattr(settings, name, "") for name in (
                "SECRET_KEY", "LLM_API_KEY", "METRICS_TOKEN", "ARCHIVE_S3_SECRET_ACCESS_KEY"))
            if v and len(str(v)) >= 8
        )
        return extra, literals
    except Exception:  # settings not configured yet (early process start-up): built-ins only
        return (), ()


def redact(text: str) -> str:
    """Mask credentials and masked fields in free text. Idempotent."""
    if not text:
        return text
    for pattern, repl in _BUILTIN_VALUE_PATTERNS:
        text = pattern.sub(repl, text)
    text = _CARD_RE.sub(_mask_card, text)
    extra, literals = _configured_patterns()
    for pattern in extra:
        text = pattern.sub(MASK, text)
    for literal in literals:
        text = text.replace(literal, MASK)
    masker = _personal_data_masker()
    if masker is not None:
        try:
            text = masker(text)
        except Exception:  # settings not ready (process start-up): the built-ins above still applied
            pass
    return text


@lru_cache(maxsize=1)
def _personal_data_masker():
    """The conversations app's personal-data masking (e-mail, cards, IBAN, phone...), when installed:
    what the platform masks in session state must not resurface in logs."""
    try:
        from apps.conversations.sensitive import mask_text
    except Exception:
        return None
    return mask_text


def redact_value(key: str, value: Any) -> Any:
    """A value safe to log or store under field `key`: secrets by name are masked, the rest redacted."""
    if SECRET_FIELD_RE.search(key or "") and value not in (None, "", [], {}):
        return MASK
    if isinstance(value, dict):
        return {k: redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(key, v) for v in value]
    if isinstance(value, (int, float, bool, type(None))):
        return value
    return redact(str(value))


def _instance_id() -> str:
    try:
        from django.conf import settings

        return getattr(settings, "INSTANCE_ID", "-")
    except Exception:
        return "-"


@contextmanager
def log_context(*, request_id: str | None = None, session_id: str | None = None) -> Iterator[None]:
    """Bind ids for the lines logged inside the block (websocket turns, tasks, commands)."""
    tokens = []
    if request_id is not None:
        tokens.append((request_id_var, request_id_var.set(str(request_id))))
    if session_id is not None:
        tokens.append((session_id_var, session_id_var.set(str(session_id))))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def bind_session_id(session_id: str | None) -> None:
    """Tag the rest of the current request/turn with a conversation session id."""
    if session_id:
        session_id_var.set(str(session_id))


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        record.session_id = session_id_var.get()
        record.instance_id = _instance_id()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Works without ContextFilter too (third-party handlers)."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
            "session_id": getattr(record, "session_id", None) or session_id_var.get(),
            "instance_id": getattr(record, "instance_id", None) or _instance_id(),
        }
        for key, value in record.__dict__.items():
            if key in _STANDARD_ATTRS or key.startswith("_") or key in payload:
                continue
            safe = redact_value(key, value)
            payload[key] = safe if isinstance(safe, (int, float, bool, type(None), str)) else redact(
                json.dumps(safe, default=str, ensure_ascii=False))
        if record.exc_info:
            payload["exc"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            payload["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(payload, ensure_ascii=False, default=str)
