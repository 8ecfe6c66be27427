"""Masking of personal data before conversation state leaves the process (e.g. into Redis).

Built-in detectors: e-mail addresses, payment card numbers (Luhn-checked, so order numbers
survive), IBANs, US social security numbers and phone numbers. SENSITIVE_PATTERNS adds regexes;
their matches become "[redacted]". The database keeps the original text: it is the system of
record and is protected as such; the hot state in Redis is a cache and holds only masked text.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
CARD_RE = re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])")
IBAN_RE = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
SSN_RE = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
# International or national numbers with at least 9 digits; dates (8 digits) and short ids are left alone.
PHONE_RE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?!\w)")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _mask_card(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    return "[card]" if 13 <= len(digits) <= 19 and _luhn_ok(digits) else m.group(0)


def _mask_phone(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    return "[phone]" if len(digits) >= 9 else m.group(0)


@functools.lru_cache(maxsize=8)
def _compiled_extra(patterns: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ImproperlyConfigured(f"SENSITIVE_PATTERNS contains an invalid regular expression {pattern!r}: {exc}") from exc
    return tuple(compiled)


def mask_text(text: str) -> str:
    if not text:
        return text
    text = EMAIL_RE.sub("[email]", text)
    text = IBAN_RE.sub("[iban]", text)
    text = SSN_RE.sub("[id]", text)
    text = CARD_RE.sub(_mask_card, text)
    text = PHONE_RE.sub(_mask_phone, text)
    for pattern in _compiled_extra(tuple(getattr(settings, "SENSITIVE_PATTERNS", []) or [])):
        text = pattern.sub("[redacted]", text)
    return text


# Fields that hold identifiers the application wrote itself, never user text: masking them would
# only corrupt them (a timestamp looks like a phone number).
IDENTIFIER_FIELDS = frozenset({"conversation_key", "conversation_id", "owner_id", "role", "session_id"})


def mask_value(value: Any, mask: Callable[[str], str] = mask_text) -> Any:
    """Mask every string inside a JSON-like value, except dict keys and IDENTIFIER_FIELDS."""
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {k: (v if k in IDENTIFIER_FIELDS else mask_value(v, mask)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_value(v, mask) for v in value]
    return value
