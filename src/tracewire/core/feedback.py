"""Feedback on a trace (thumbs up/down, a score, a comment), validated where it enters, and
who may give it through the middleware's feedback route.

The route faces the internet, so the middleware records on each web request's trace (the tag
``FEEDBACK_FROM_TAG``, from the request's end) who may give feedback on it there:

- the :func:`owner` digest of the identity the app established for the request (its auth's
  ``scope["user"]``, ``identify``, ``set_user``/``set_session``, the keyed session cookie,
  trusted identity headers): only a feedback request the app identifies the same way;
- ``BEARER`` when nobody was identified and the request id was the middleware's own
  (unguessable, echoed only to that client): whoever holds the request id or the trace id;
- no tag (nobody identified, a request id the client chose, which another client can choose
  too; or not a web request): only by trace id, which is unguessable (core/ids.py).

``tracewire.log_feedback`` is the app's own word and is not checked.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import asdict, dataclass, field

from tracewire.core.context import MAX_REQUEST_ID
from tracewire.core.text import storable

MAX_NAME = 250
MAX_TEXT = 5000

BEARER = "request_id"
ANONYMOUS = "anonymous"  # a feedback request the app did not identify


def owner(user: str | None, session: str | None) -> str | None:
    """Whom feedback on a request's trace must come from: the user the app established, else
    its session; None if neither. A digest: fixed length, nothing a search filter misreads."""
    if user:
        kind, value = "user", user
    elif session:
        kind, value = "session", session
    else:
        return None
    return hashlib.sha256(f"{kind}\0{value}".encode()).hexdigest()[:32]


def may_post(feedback_from: str | None, poster: str) -> bool:
    """Whether route feedback from ``poster`` (an :func:`owner` digest or ``ANONYMOUS``) may
    land on a trace whose ``FEEDBACK_FROM_TAG`` is ``feedback_from``, found by its trace id."""
    return feedback_from in (None, BEARER) or feedback_from == poster


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)  # an int past a double's range overflows here
    except OverflowError:
        return False


@dataclass(frozen=True)
class Feedback:
    name: str
    value: bool | int | float | str
    request_id: str | None = None
    trace_id: str | None = None
    rationale: str | None = None
    source_id: str | None = None  # the user giving it
    expires: float = 0.0  # unix time after which it is dropped if its trace never appeared
    # Posted through the feedback route by this owner() digest (or ANONYMOUS): applied only
    # where it may be (see the module's docstring). None: the app's own, not checked.
    poster: str | None = None
    # Lets the shipper apply it exactly once even if it is shipped twice.
    feedback_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if (self.request_id is None) == (self.trace_id is None):
            raise ValueError("feedback needs exactly one of request_id or trace_id")
        key = self.request_id if self.request_id is not None else self.trace_id
        if (
            not isinstance(key, str)
            or not key
            or len(key) > 64
            or not key.isprintable()
            or "'" in key
            or (self.request_id is not None and len(key) > MAX_REQUEST_ID)
        ):
            raise ValueError("feedback request_id/trace_id must be a short printable id")
        if not isinstance(self.name, str) or not self.name.strip() or len(self.name) > MAX_NAME:
            raise ValueError(
                f"feedback name must be a non-empty string of at most {MAX_NAME} characters"
            )
        if not isinstance(self.value, (bool, int, float, str)) or (
            isinstance(self.value, str) and len(self.value) > MAX_TEXT
        ):
            raise ValueError(
                "feedback value must be a bool, a number or a string of at most "
                f"{MAX_TEXT} characters"
            )
        if not isinstance(self.value, (bool, str)) and not _finite(self.value):
            # MLflow stores a number as a double; a tracking server fails every read of a
            # trace (and of its experiment's trace list) that holds an infinite one.
            raise ValueError("feedback value must be a finite number (not NaN or infinite)")
        for label, text in (("rationale", self.rationale), ("source_id", self.source_id)):
            if text is not None and (not isinstance(text, str) or len(text) > MAX_TEXT):
                raise ValueError(
                    f"feedback {label} must be a string of at most {MAX_TEXT} characters"
                )
        for name in ("name", "value", "rationale", "source_id"):
            if isinstance(text := getattr(self, name), str):
                object.__setattr__(self, name, storable(text))  # frozen: set once, here

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()
