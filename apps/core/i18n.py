"""Which language to speak: the interface language of a websocket connection, and the reply language
of a question.

HTTP requests get their language from LocaleMiddleware (the user's choice in the language cookie, else
Accept-Language, else LANGUAGE_CODE). Websockets do not pass through Django's middleware, so the chat
consumer asks `language_from_scope` for the same answer from the handshake's cookie and headers.
"""
from __future__ import annotations

import re
from http.cookies import SimpleCookie
from typing import Any

from django.conf import settings
from django.utils import translation
from django.utils.translation import trans_real

CHINESE = "zh-hans"
ENGLISH = "en"

# Han ideographs (incl. extension A and compatibility ideographs); kana/hangul are not Chinese.
_HAN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD_RE = re.compile(r"[A-Za-z]{2,}")


def _supported(code: str | None) -> str | None:
    if not code:
        return None
    try:
        return translation.get_supported_language_variant(code)
    except LookupError:
        return None


def language_from_scope(scope: dict[str, Any]) -> str:
    """The interface language for an ASGI scope: the language cookie, else Accept-Language, else the default."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
    cookie_header = headers.get("cookie", "")
    if cookie_header:
        try:
            cookies = SimpleCookie()
            cookies.load(cookie_header)
            morsel = cookies.get(settings.LANGUAGE_COOKIE_NAME)
            if morsel is not None and (code := _supported(morsel.value)):
                return code
        except Exception:  # a malformed Cookie header is the client's problem, not a reason to fail
            pass
    for accept, _q in trans_real.parse_accept_lang_header(headers.get("accept-language", "")):
        if accept == "*":
            break
        if code := _supported(accept):
            return code
    return _supported(settings.LANGUAGE_CODE) or settings.LANGUAGE_CODE


def question_language(text: str) -> str | None:
    """'zh-hans' when the text is clearly Chinese, 'en' when clearly English, else None.

    Questions mix languages ("VPN 怎么连接？", "what is 安心保障计划?"): counting two Han characters as a
    word, the language with the most words wins, Chinese when about even. A question with no words
    (digits, an order number, "VPN?") says nothing.
    """
    han_words = len(_HAN_RE.findall(text or "")) / 2
    latin_words = _LATIN_WORD_RE.findall(text or "")
    if han_words and han_words >= 0.6 * len(latin_words):
        return CHINESE
    if len(latin_words) >= 2 or (latin_words and len(latin_words[0]) >= 4):
        return ENGLISH
    return None


def reply_language(text: str) -> str:
    """The language to answer `text` in: the question's own when clear, else the active interface language."""
    return question_language(text) or translation.get_language() or settings.LANGUAGE_CODE


def command_language(environ: dict[str, str]) -> str | None:
    """The language for management command output: KOTAEMON_COMMAND_LANGUAGE when it names one, else (for
    "auto") the operator's POSIX locale in gettext's order (LANGUAGE, LC_ALL, LC_MESSAGES, LANG); None when
    nothing supported is asked for (the default, English, stays)."""
    wanted = environ.get("KOTAEMON_COMMAND_LANGUAGE", "")
    if not wanted:
        return None
    if wanted != "auto":
        return _supported(wanted.replace("_", "-").lower())
    for var in ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG"):
        for value in (environ.get(var) or "").split(":"):
            code = value.split(".")[0].split("@")[0].replace("_", "-").lower()
            if code and code not in ("c", "posix") and (supported := _supported(code)):
                return supported
    return None
