"""Credentials out of text before it reaches disk or a log.

Scrubbed: the secret part of a URI's userinfo (``user:pass@`` -> ``user:***@``, ``token@`` ->
``***@``); the values of credential-like parameters, in a query string or in text
(``api_key=...``, ``"token": "..."``); ``Authorization``-style header values and bearer tokens.
A name is credential-like if it contains key, token, secret, passw(or)d, pwd, auth, sig,
credential, session or cookie, or is ``code`` (OAuth).

Applied to text tracewire records but did not write itself: the tracking URI in the spool,
exception messages and stack traces on spans, request parameters (``extra_query``), the store's
refusals, tracewire's log lines (the shipper's warnings repeat MLflow's messages, which repeat
the tracking URI) and the CLI's errors. Prompts and completions are the user's content and are
not scanned (the ``redact`` hook is for them).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

_WORDS = r"key|token|secret|passw|pwd|auth|sig|credential|session|cookie"
# Bounded repeats: a long word costs linear time, not quadratic.
_NAME = rf"[\w.-]{{0,40}}(?:{_WORDS})[\w.-]{{0,40}}|code"
_CREDENTIAL_NAME = re.compile(rf"(?:{_NAME})", re.IGNORECASE)

_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)([^\s/?#@\"'<>]+)@", re.IGNORECASE)
# "name": "value" / 'name': 'value' (a dict's repr, JSON)
_QUOTED = re.compile(
    rf"""(?<![\w.-])(["'])((?:{_NAME})\1\s*:\s*)(["'])(?:(?!\3).)*\3""", re.IGNORECASE
)
_HEADER = re.compile(
    r"(?<![\w.-])((?:proxy-)?authorization|(?:set-)?cookie|(?:x-)?api-key)"
    r"(\s*:\s*)[^\r\n'\"]+",
    re.IGNORECASE,
)
_BEARER = re.compile(r"\b(bearer)\s+[\w.~+/=-]+", re.IGNORECASE)
# name=value, in a query string or anywhere in text (a keyword argument in a stack trace)
_PAIR = re.compile(
    rf"""(?<![\w.-])((?:{_NAME})\s*=\s*)(?:"[^"]*"|'[^']*'|[^\s&#"',;)<>\]}}]+)""", re.IGNORECASE
)


def _userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match[2].partition(":")
    return f"{match[1]}{user}:{MASK}@" if colon else f"{match[1]}{MASK}@"


def text(value: str) -> str:
    """``value`` with every credential it shows masked."""
    value = _USERINFO.sub(_userinfo, value)
    value = _QUOTED.sub(rf"\1\2\3{MASK}\3", value)
    value = _HEADER.sub(rf"\1\2{MASK}", value)
    value = _BEARER.sub(rf"\1 {MASK}", value)
    return _PAIR.sub(rf"\1{MASK}", value)


def params(values: Any) -> Any:
    """Request parameters (``extra_query``) with credential-like values masked; anything but a
    mapping is returned as it is."""
    if not isinstance(values, Mapping):
        return values
    return {
        k: MASK if isinstance(k, str) and _CREDENTIAL_NAME.fullmatch(k) else v
        for k, v in values.items()
    }


class LogFilter(logging.Filter):
    """On tracewire's logger: each line scrubbed, its traceback too."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if (clean := text(message)) != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = text(logging.Formatter().formatException(record.exc_info))
        return True
