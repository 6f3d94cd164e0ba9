"""Feedback on a trace (thumbs up/down, a score, a comment), validated where it enters."""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field

from tracewire.core.context import MAX_REQUEST_ID

MAX_NAME = 250
MAX_TEXT = 5000


@dataclass(frozen=True)
class Feedback:
    name: str
    value: bool | int | float | str
    request_id: str | None = None
    trace_id: str | None = None
    rationale: str | None = None
    source_id: str | None = None  # the user giving it
    expires: float = 0.0  # unix time after which it is dropped if its trace never appeared
    # Lets the shipper apply it exactly once even if it is shipped twice.
    feedback_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if (self.request_id is None) == (self.trace_id is None):
            raise ValueError("feedback needs exactly one of request_id or trace_id")
        key = self.request_id if self.request_id is not None else self.trace_id
        if not isinstance(key, str) or not key or len(key) > 64 or not key.isprintable() \
                or "'" in key or (self.request_id is not None and len(key) > MAX_REQUEST_ID):
            raise ValueError("feedback request_id/trace_id must be a short printable id")
        if not isinstance(self.name, str) or not self.name.strip() or len(self.name) > MAX_NAME:
            raise ValueError(f"feedback name must be a non-empty string of at most {MAX_NAME} "
                             "characters")
        if not isinstance(self.value, (bool, int, float, str)) or (
                isinstance(self.value, str) and len(self.value) > MAX_TEXT):
            raise ValueError("feedback value must be a bool, a number or a string of at most "
                             f"{MAX_TEXT} characters")
        if isinstance(self.value, float) and self.value != self.value:
            raise ValueError("feedback value must not be NaN")
        for label, text in (("rationale", self.rationale), ("source_id", self.source_id)):
            if text is not None and (not isinstance(text, str) or len(text) > MAX_TEXT):
                raise ValueError(f"feedback {label} must be a string of at most {MAX_TEXT} "
                                 "characters")

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()
