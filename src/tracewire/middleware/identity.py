"""Who and what a request is, from its headers: request id, W3C ``traceparent``, session and
user. Everything here is hostile input: values are validated and replaced or dropped, never
reflected or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any

from tracewire.core.context import MAX_REQUEST_ID, MAX_USER_ID

# What an incoming request id may hold: short, and nothing a log line, a header or a filter
# string could misread. Anything else is replaced by a fresh id.
_REQUEST_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:-]{{0,{MAX_REQUEST_ID - 1}}}")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")


def request_id(value: bytes) -> str | None:
    """The incoming id if it is one the store and a header can hold as is (else the caller
    makes a fresh one)."""
    text = value.decode("latin-1")
    return text if _REQUEST_ID.fullmatch(text) else None


def traceparent(value: bytes | None) -> tuple[int, int] | None:
    """(trace id, parent span id) of a valid W3C ``traceparent``; None for anything else
    (uppercase, wrong length, version ff, all-zero ids), which then starts a new trace."""
    if value is None or len(value) < 55:
        return None
    match = _TRACEPARENT.match(value.decode("latin-1"))
    if match is None:
        return None
    version, trace_id, span_id = match.groups()
    # Version 00 is exactly 55 characters; later versions may append fields after a dash.
    if (
        version == "ff"
        or (version == "00" and len(value) != 55)
        or (len(value) > 55 and value[55:56] != b"-")
    ):
        return None
    trace, span = int(trace_id, 16), int(span_id, 16)
    return (trace, span) if trace and span else None


def header_text(value: bytes | None, limit: int) -> str | None:
    """A session or user id from a header: printable ASCII within the store's limit, else
    nothing (an invalid value is dropped, never replaced by a made-up one)."""
    if value is None or not value or len(value) > limit:
        return None
    text = value.decode("latin-1")
    return text if text.isascii() and text.isprintable() else None


def cookie(header: bytes | None, name: str) -> bytes | None:
    """One cookie's raw value from a ``Cookie`` header."""
    if header is None:
        return None
    wanted = name.encode("latin-1") + b"="
    for part in header.split(b";"):
        part = part.strip()
        if part.startswith(wanted):
            return part[len(wanted) :].strip(b'"') or None
    return None


def cookie_session(value: bytes | None, key: bytes) -> str | None:
    """A session id from a session cookie: a keyed hash, never the cookie itself (session
    cookies are often credentials). The same cookie gives the same id in every worker."""
    if value is None or len(value) > 4096:
        return None
    return hmac.new(key, value, hashlib.sha256).hexdigest()[:32]


def scope_user(scope: Mapping[str, Any]) -> str | None:
    """The authenticated user Starlette's ``AuthenticationMiddleware`` (or any ASGI auth that
    follows its ``scope["user"]`` convention) put in the scope."""
    user = scope.get("user")
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    for attribute in ("identity", "display_name"):
        try:
            value = getattr(user, attribute)
        except NotImplementedError:  # BaseUser leaves them abstract
            continue
        if isinstance(value, str) and value and len(value) <= MAX_USER_ID and value.isprintable():
            return value
    return None
